"""Loading the Wan2.2-S2V DiT from its official sharded checkpoint, with the LiveAvatar LoRA merged in.

Why stream: at 14B the bf16 weights are 32.6 GB in four shards. The model is built on `meta` (no memory), then each
shard is opened with `safe_open` and its tensors are moved to the target device one by one and assigned to the
model, so the host never holds more than one tensor beyond what the device already has. LoRA updates are applied to
each target weight as it passes, on the target device, before the dtype cast (the official code merges before FP8).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from avatars.liveavatar.config import DiTConfig
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.dit.transformer import stored_dtype
from avatars.liveavatar.weights.errors import CheckpointError, listing
from avatars.liveavatar.weights.lora import LORA_SCALE, lora_target_modules, merge_into_weight, read_lora

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the download may be damaged") from err


def read_dit_config(checkpoint_dir: str | Path) -> DiTConfig:
    """The DiT architecture from the checkpoint's `config.json`."""
    path = Path(checkpoint_dir) / CONFIG_NAME
    try:
        return DiTConfig.from_dict(_read_json(path))
    except CheckpointError:
        raise
    except ValueError as err:
        raise CheckpointError(f"{path} does not describe a supported Wan2.2-S2V DiT: {err}") from err


def read_weight_map(checkpoint_dir: str | Path) -> dict[str, str]:
    """Tensor name → shard file name, from the index; raises CheckpointError listing shards not on disk."""
    checkpoint_dir = Path(checkpoint_dir)
    index = _read_json(checkpoint_dir / INDEX_NAME)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{checkpoint_dir / INDEX_NAME} has no 'weight_map'")
    missing = sorted({shard for shard in weight_map.values() if not (checkpoint_dir / shard).is_file()})
    if missing:
        raise CheckpointError(
            f"incomplete checkpoint in {checkpoint_dir}: missing shard files {listing(missing)}"
        )
    return weight_map


def _read_tensors(shard_path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the named tensors of one shard, turning a damaged file or a missing name into a CheckpointError."""
    try:
        with safe_open(str(shard_path), framework="pt", device="cpu") as f:
            absent = sorted(set(names) - set(f.keys()))
            if absent:
                raise CheckpointError(
                    f"{shard_path} lacks tensors its index assigns to it: {listing(absent)}"
                )
            for name in names:
                yield name, f.get_tensor(name)
    except SafetensorError as err:
        raise CheckpointError(
            f"{shard_path} is not a readable safetensors file ({err}); the download may be damaged"
        ) from err


def load_dit(
    checkpoint_dir: str | Path,
    *,
    lora_path: str | Path | None = None,
    lora_scale: float = LORA_SCALE,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> LiveAvatarDiT:
    """Build the DiT from `checkpoint_dir` (config.json + index + shards) and return it in eval mode.

    Raises CheckpointError for a missing or damaged file, for tensor names the model does not have or lacks
    (listing them), for shape mismatches, and for LoRA keys that match no target module.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = read_dit_config(checkpoint_dir)
    weight_map = read_weight_map(checkpoint_dir)
    with torch.device("meta"):
        model = LiveAvatarDiT.from_config(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    missing = sorted(set(expected) - set(weight_map))
    unexpected = sorted(set(weight_map) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {listing(unexpected)}")
        raise CheckpointError(
            f"{checkpoint_dir} does not match the DiT built from its config; " + "; ".join(parts)
        )

    lora = read_lora(lora_path, lora_target_modules(model)) if lora_path is not None else {}
    merged = 0
    for shard in sorted(set(weight_map.values())):
        shard_path = checkpoint_dir / shard
        wanted = sorted(name for name, file in weight_map.items() if file == shard)
        loaded: dict[str, torch.Tensor] = {}
        for name, tensor in _read_tensors(shard_path, wanted):
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(
                    f"{shard_path}: {name} has shape {tuple(tensor.shape)}, the model expects {expected[name]}"
                )
            tensor = tensor.to(device)
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in lora:
                tensor = merge_into_weight(tensor, lora[module], lora_scale)
                merged += 1
            loaded[name] = tensor.to(stored_dtype(name, dtype)) if tensor.is_floating_point() else tensor
        model.load_state_dict(loaded, strict=False, assign=True)
        logger.info("loaded %d tensors from %s", len(loaded), shard)

    logger.info("DiT loaded from %s (%d LoRA updates merged, scale %.3g)", checkpoint_dir, merged, lora_scale)
    return model.eval().requires_grad_(False)
