"""Turning a loaded model's linear layers into FP8 ones, as LiveAvatar's `--fp8` flag does after loading.

The layers themselves (`FP8Linear`) and their compute live in `avatars.liveavatar.fp8_linear`, below both `dit/`
(which runs them) and this folder (which converts weights into them).
"""

from __future__ import annotations

import logging

from torch import nn

from avatars.liveavatar.fp8_linear import FP8Linear

logger = logging.getLogger(__name__)

# Linear layers the official code keeps in bf16 (a substring of the module's qualified name excludes it).
EXCLUDED_FROM_FP8 = (
    "text_embedding",
    "time_embedding",
    "time_projection",
    "head.head",
    "casual_audio_encoder.encoder.final_linear",
)


def is_excluded_from_fp8(module_name: str, excluded: tuple[str, ...] = EXCLUDED_FROM_FP8) -> bool:
    """Whether the official FP8 conversion leaves this linear layer in its original dtype."""
    return any(part in module_name for part in excluded)


def convert_linears_to_fp8(model: nn.Module, excluded: tuple[str, ...] = EXCLUDED_FROM_FP8) -> int:
    """Replace every nn.Linear of `model` not excluded by name with an FP8Linear, in place; returns how many.

    Run it after the LoRA merge: the merge needs the bf16 weights.
    """
    targets = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not is_excluded_from_fp8(name, excluded)
    ]
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, FP8Linear.from_linear(getattr(parent, child_name)))
    logger.info("converted %d linear layers to FP8", len(targets))
    return len(targets)
