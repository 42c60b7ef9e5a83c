"""Check on the ISPA and generation settings (numbers may arrive as floats or strings from Gradio)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from app.validation.errors import ValidationError
from avatars.liveavatar.block_layout import LATENT_FRAMES_PER_BLOCK

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Settings:
    k_fraction: float  # share of layers that become local (L) after warmup
    t_warm: int  # warmup length in latent frames, a whole number of blocks
    lam: float  # ridge regulariser λ
    seed: int
    warnings: list[str] = field(default_factory=list)


def validate_settings(
    *,
    k_fraction: Any,
    t_warm: Any,
    lam: Any,
    seed: Any,
    frames_per_block: int = LATENT_FRAMES_PER_BLOCK,
) -> Settings:
    """Check the ISPA and generation settings; T_warm is rounded up to whole blocks with a warning."""
    notes: list[str] = []
    k = _number(k_fraction, "The fraction of local layers (k_fraction)")
    if not 0 < k <= 1:
        raise ValidationError(f"The fraction of local layers (k_fraction) must be in (0, 1], got {k:g}.")
    warm = _whole(t_warm, "The warmup length (T_warm)")
    if warm < 1:
        raise ValidationError(f"The warmup length (T_warm) must be at least 1 latent frame, got {warm}.")
    if warm % frames_per_block:
        rounded = -(-warm // frames_per_block) * frames_per_block
        notes.append(
            f"T_warm = {warm} latent frames is not a whole number of {frames_per_block}-frame blocks; "
            f"using {rounded}."
        )
        warm = rounded
    lam_value = _number(lam, "The regulariser (λ)")
    if lam_value <= 0:
        raise ValidationError(f"The regulariser (λ) must be greater than 0, got {lam_value:g}.")
    seed_value = _whole(seed, "The seed")
    if not 0 <= seed_value <= MAX_SEED:
        raise ValidationError(f"The seed must be between 0 and {MAX_SEED}, got {seed_value}.")
    return Settings(k_fraction=k, t_warm=warm, lam=lam_value, seed=seed_value, warnings=notes)


def _number(value: Any, label: str) -> float:
    """A finite real number; numeric strings are accepted because text boxes deliver them."""
    if isinstance(value, bool) or value is None:
        raise ValidationError(f"{label} must be a number.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValidationError(f"{label} must be a number.") from None
    if not math.isfinite(number):
        raise ValidationError(f"{label} must be a finite number.")
    return number


def _whole(value: Any, label: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    number = _number(value, label)
    if not number.is_integer():
        raise ValidationError(f"{label} must be a whole number, got {number:g}.")
    return int(number)
