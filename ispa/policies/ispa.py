"""ISPA: warm up with full attention, absorb the history of the K best layers into their projections, and
optionally recalibrate when the scene changes (paper Sections 3.1-3.3)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ispa.cache import CacheLayout
from ispa.checks import check_positive_int, is_int, is_real
from ispa.policies.base import Action, Phase, Policy, PolicyState

__all__ = ["ISPAPolicy", "history_mass_drift"]


def history_mass_drift(
    reference: list[float | None] | None, current: list[float | None] | None
) -> float | None:
    """Relative L1 change of the per-layer history mass: sum |current - reference| / sum reference.

    Only layers measured in both lists count. None when there is nothing to compare.
    """
    if reference is None or current is None:
        return None
    pairs = [(r, c) for r, c in zip(reference, current, strict=True) if r is not None and c is not None]
    total = sum(r for r, _ in pairs)
    if not pairs or total <= 0.0:
        return None
    return sum(abs(c - r) for r, c in pairs) / total


@dataclass
class ISPAPolicy(Policy):
    """Instance-Specific Parametric Absorption.

    Parameters
    ----------
    k_fraction : share of layers turned local at each absorb; K = round(k_fraction * N), halves rounded up.
    t_warm : latent frames of warmup (and of each recalibration) before absorbing; paper default 12.
    lam : ridge regulariser of the absorb solve; paper default 1e-3.
    auto_recalibrate : recalibrate on its own when the scene changes (rule below); manual requests always work.
    recal_threshold, recal_patience : parameters of that rule.

    Automatic recalibration rule. After an absorb, the L-layers see no history, but the F-layers still split their
    attention into local and history parts, so they measure, per block, the share of softmax mass that goes to
    history. That share is recorded per F-layer in the block that absorbed (the reference). A scene change shows up
    as a shift of that share: new queries find old history less (or more) relevant, which is exactly when the
    L-layers' fitted correction goes stale. Each later block computes the drift
    sum_l |mass_l - reference_l| / sum_l reference_l over the F-layers; when it exceeds `recal_threshold` for
    `recal_patience` consecutive blocks, recalibration starts (one noisy block is not enough).
    """

    k_fraction: float = 0.5
    t_warm: int = 12
    lam: float = 1e-3
    auto_recalibrate: bool = False
    recal_threshold: float = 0.15
    recal_patience: int = 2

    name: ClassVar[str] = "ispa"
    initial_phase: ClassVar[Phase] = "warmup"

    def __post_init__(self) -> None:
        if not (is_real(self.k_fraction) and 0.0 <= self.k_fraction <= 1.0):
            raise ValueError(f"k_fraction must be in [0, 1], got {self.k_fraction!r}")
        if not is_int(self.t_warm) or self.t_warm < 1:
            raise ValueError(f"t_warm must be a positive number of latent frames, got {self.t_warm!r}")
        if not (is_real(self.lam) and math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lam must be a positive finite number, got {self.lam!r}")
        if not isinstance(self.auto_recalibrate, bool):
            raise ValueError(f"auto_recalibrate must be a bool, got {self.auto_recalibrate!r}")
        if not (
            is_real(self.recal_threshold) and math.isfinite(self.recal_threshold) and self.recal_threshold > 0
        ):
            raise ValueError(f"recal_threshold must be positive, got {self.recal_threshold!r}")
        check_positive_int(self.recal_patience, "recal_patience")

    def check_layout(self, layout: CacheLayout, num_layers: int) -> None:
        # Statistics come only from forwards that see history, i.e. from the second block on.
        if self.t_warm <= layout.frames_per_block:
            raise ValueError(
                f"t_warm ({self.t_warm} latent frames) must exceed one block ({layout.frames_per_block} frames): "
                "the first block has no history to learn from"
            )

    def num_local_layers(self, num_layers: int) -> int:
        return math.floor(self.k_fraction * num_layers + 0.5)

    def ridge_lambda(self) -> float:
        return float(self.lam)

    def collects_statistics(self, state: PolicyState) -> bool:
        return state.phase in ("warmup", "recalibrating")

    def decide(self, state: PolicyState, history_mass: list[float | None] | None) -> Action | None:
        if state.phase in ("warmup", "recalibrating"):
            return "absorb" if state.frames_in_phase >= self.t_warm else None
        if state.recalibration_requested:
            return "recalibrate"
        if self.auto_recalibrate:
            drift = history_mass_drift(state.reference_history_mass, history_mass)
            exceeded = drift is not None and drift > self.recal_threshold
            state.drift_streak = state.drift_streak + 1 if exceeded else 0
            if state.drift_streak >= self.recal_patience:
                return "recalibrate"
        return None
