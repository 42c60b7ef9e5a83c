"""The LiveAvatar LoRA (`liveavatar.safetensors`): reading its factors and merging them into base weights.

The official pipeline wraps the DiT with PEFT (rank 128, alpha 64, targets q,k,v,o,ffn.0,ffn.2), loads the file
into it and calls `merge_and_unload()`, all before the FP8 conversion. Merging while the base weights stream in
gives the same weights without PEFT: `W ← W + (alpha / rank) · B @ A`.

Key names are PEFT's: `<module>.lora_A.default.weight` (A, [rank, in]) and `<module>.lora_B.default.weight`
(B, [out, rank]), optionally prefixed with `base_model.model.` (the official loader adds that prefix when it is
absent, so both spellings load there). The adapter name `.default` may also be absent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from avatars.liveavatar.weights.errors import CheckpointError, listing

logger = logging.getLogger(__name__)

LORA_RANK = 128
LORA_ALPHA = 64
LORA_SCALE = LORA_ALPHA / LORA_RANK  # 0.5
LORA_TARGET_SUFFIXES = ("q", "k", "v", "o", "ffn.0", "ffn.2")

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class LoRAFactors:
    """One module's low-rank update: `down` is A [rank, in], `up` is B [out, rank]."""

    down: torch.Tensor
    up: torch.Tensor

    def delta(self, scale: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """`scale · B @ A` in fp32 on `device`, shaped like the module's weight [out, in]."""
        up = self.up.to(device=device, dtype=torch.float32)
        down = self.down.to(device=device, dtype=torch.float32)
        return scale * (up @ down)


def lora_target_modules(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Linear modules the official PEFT config targets, with their weight shapes [out, in].

    PEFT matches a target name against the end of the module's qualified name; at 14B this selects 448 modules
    (40 blocks × self_attn/cross_attn q,k,v,o + ffn.0, ffn.2, and the 12 audio injectors' q,k,v,o). Works on `meta`.
    """
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(name == suffix or name.endswith("." + suffix) for suffix in LORA_TARGET_SUFFIXES)
    }


def read_lora(path: str | Path, targets: Mapping[str, tuple[int, int]]) -> dict[str, LoRAFactors]:
    """Read a LoRA file and check it against the model's target modules (name → weight shape).

    Raises CheckpointError naming the keys that are not LoRA factors, that match no target module, that lack
    their partner factor, or whose shapes do not fit the module.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path}")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    not_lora: list[str] = []
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                match = _LORA_KEY.match(key.removeprefix(_PEFT_PREFIX))
                if match is None:
                    not_lora.append(key)
                    continue
                halves.setdefault(match["module"], {})[match["factor"]] = f.get_tensor(key)
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err

    if not_lora:
        raise CheckpointError(
            f"{path}: keys that are not LoRA factors (expected '<module>.lora_A/B…weight'): {listing(not_lora)}"
        )
    unknown = sorted(module for module in halves if module not in targets)
    if unknown:
        raise CheckpointError(f"{path}: LoRA keys match no target module of the model: {listing(unknown)}")
    unpaired = sorted(module for module, pair in halves.items() if set(pair) != {"A", "B"})
    if unpaired:
        raise CheckpointError(
            f"{path}: LoRA modules missing their lora_A or lora_B factor: {listing(unpaired)}"
        )

    factors: dict[str, LoRAFactors] = {}
    bad_shapes: list[str] = []
    for module, pair in halves.items():
        down, up = pair["A"], pair["B"]
        out_features, in_features = targets[module]
        if (
            down.dim() != 2
            or up.dim() != 2
            or down.shape[1] != in_features
            or up.shape[0] != out_features
            or up.shape[1] != down.shape[0]
        ):
            bad_shapes.append(
                f"{module} (A {tuple(down.shape)}, B {tuple(up.shape)}, weight {(out_features, in_features)})"
            )
            continue
        factors[module] = LoRAFactors(down=down, up=up)
    if bad_shapes:
        raise CheckpointError(f"{path}: LoRA factor shapes do not fit their modules: {listing(bad_shapes)}")
    if len(factors) < len(targets):
        logger.warning("LoRA %s covers %d of the %d target modules", path, len(factors), len(targets))
    return factors


def merge_into_weight(weight: torch.Tensor, factors: LoRAFactors, scale: float = LORA_SCALE) -> torch.Tensor:
    """`weight + scale · B @ A`, computed in fp32 on the weight's device and returned as fp32."""
    return weight.float() + factors.delta(scale, device=weight.device)
