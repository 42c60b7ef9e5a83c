"""Check on the ISPA and generation settings, as they arrive from the page or an API client.

The app takes these values raw (see `app.raw_numbers`): a number, a numeric string, or anything a client sends
(None, True, "NaN", "abc"). Every refusal names the field and the values it allows, and nothing is rounded
silently: T_warm is rounded up to whole blocks with a warning, a fractional seed is refused.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from app.validation.errors import ValidationError
from avatars.liveavatar.block_layout import LATENT_FRAMES_PER_BLOCK

MAX_SEED = 2**32 - 1
MIN_WARM_BLOCKS = 2  # the ISPA policy needs a warmup longer than one block
MAX_T_WARM = 48  # latent frames (16 blocks, 7.7 s of video)

K_FRACTION = "The fraction of local layers (k_fraction)"
T_WARM = "The warmup length (T_warm)"
LAM = "The regulariser (λ)"
SEED = "The seed"


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
    k_allowed = "a number in (0, 1]"
    k = _number(k_fraction, K_FRACTION, k_allowed)
    if not 0 < k <= 1:
        raise ValidationError(f"{K_FRACTION} must be {k_allowed}, got {k:g}.")
    min_warm = MIN_WARM_BLOCKS * frames_per_block
    warm_allowed = (
        f"a whole number of latent frames from {min_warm} to {MAX_T_WARM}, "
        f"rounded up to whole {frames_per_block}-frame blocks"
    )
    warm = given = _whole(t_warm, T_WARM, warm_allowed)
    if warm % frames_per_block:
        rounded = -(-warm // frames_per_block) * frames_per_block
        notes.append(
            f"T_warm = {warm} latent frames is not a whole number of {frames_per_block}-frame blocks; "
            f"using {rounded}."
        )
        warm = rounded
    if not min_warm <= warm <= MAX_T_WARM:
        raise ValidationError(f"{T_WARM} must be {warm_allowed}, got {given}.")
    lam_allowed = "a number greater than 0"
    lam_value = _number(lam, LAM, lam_allowed)
    if lam_value <= 0:
        raise ValidationError(f"{LAM} must be {lam_allowed}, got {lam_value:g}.")
    seed_allowed = f"a whole number from 0 to {MAX_SEED}"
    seed_value = _whole(seed, SEED, seed_allowed)
    if not 0 <= seed_value <= MAX_SEED:
        raise ValidationError(f"{SEED} must be {seed_allowed}, got {seed_value}.")
    return Settings(k_fraction=k, t_warm=warm, lam=lam_value, seed=seed_value, warnings=notes)


def _shown(value: Any) -> str:
    """The value as the message quotes it, cut short (a client may send anything)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any, label: str, allowed: str) -> float:
    """A finite real number; numeric strings are accepted because text boxes and API clients send them."""
    if isinstance(value, bool) or value is None:
        raise ValidationError(f"{label} must be {allowed}, got {_shown(value)}.")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValidationError(f"{label} must be {allowed}, got {_shown(value)}.") from None
    if not math.isfinite(number):
        raise ValidationError(f"{label} must be {allowed} (a finite number), got {_shown(value)}.")
    return number


def _whole(value: Any, label: str, allowed: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    number = _number(value, label, allowed)
    if not number.is_integer():
        raise ValidationError(f"{label} must be {allowed}, got {number:g} (it is not rounded for you).")
    return int(number)
