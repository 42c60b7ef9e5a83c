"""The baseline: every layer keeps its full (ring-bounded) history forever."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ispa.policies.base import Action, Phase, Policy, PolicyState

__all__ = ["FullPolicy"]


@dataclass
class FullPolicy(Policy):
    """Never absorbs. Its forwards use the same decomposed attention as ISPA's warmup, so the two agree bit for bit
    until ISPA's first absorb."""

    name: ClassVar[str] = "full"
    initial_phase: ClassVar[Phase] = "full"

    def collects_statistics(self, state: PolicyState) -> bool:
        return False

    def decide(self, state: PolicyState, history_mass: list[float | None] | None) -> Action | None:
        return None
