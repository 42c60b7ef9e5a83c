"""Policies that keep, in every layer, a token-granular part of the history sized to ISPA's KV bytes.

ISPA at `k_fraction` ends its warmup with K = round(k_fraction · N) layers holding only their sink and N − K layers
holding their whole ring. A budgeted policy warms up the same way (full history, so it agrees with Full until
then), and at the same moment trims every layer's history of every ring to the share (N − K) / N of what a full
ring holds, counted in bytes: the same KV bytes as ISPA, spread over all layers instead of concentrated in the
F-layers. Which tokens stay is the subclass's choice (the newest ones, or those with the most attention mass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from ispa.checks import is_int, is_real
from ispa.policies.base import Action, Phase, Policy, PolicyState

__all__ = ["BudgetedPolicy", "Retention"]

Retention = Literal["newest", "mass"]


@dataclass
class BudgetedPolicy(Policy):
    """Parameters: `k_fraction` (the ISPA setting whose memory to match) and `t_warm` (latent frames with full
    history before the trim, as ISPA's warmup)."""

    k_fraction: float = 0.5
    t_warm: int = 12

    initial_phase: ClassVar[Phase] = "warmup"
    after_phase: ClassVar[Phase] = "evicted"
    retention: ClassVar[Retention]

    def __post_init__(self) -> None:
        if not (is_real(self.k_fraction) and 0.0 <= self.k_fraction <= 1.0):
            raise ValueError(f"k_fraction must be in [0, 1], got {self.k_fraction!r}")
        if not is_int(self.t_warm) or self.t_warm < 1:
            raise ValueError(f"t_warm must be a positive number of latent frames, got {self.t_warm!r}")

    def kept_share(self, num_layers: int) -> float:
        """Share of a full ring's bytes each layer keeps: (N − K) / N with ISPA's K."""
        local = math.floor(self.k_fraction * num_layers + 0.5)
        return (num_layers - local) / num_layers

    def collects_statistics(self, state: PolicyState) -> bool:
        return False

    def decide(self, state: PolicyState, history_mass: list[float | None] | None) -> Action | None:
        if state.phase == "warmup" and state.frames_in_phase >= self.t_warm:
            return "trim"
        return None
