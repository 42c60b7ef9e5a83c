"""What a KV policy decides, and the state it decides on.

A policy is a small validated dataclass (kvpress style) that only makes decisions: which phase a session starts in,
whether the current phase collects absorption statistics, and what to do at the end of a block: "absorb" (solve,
rank and turn the best layers local: ISPA, Evict), "trim" (cut every layer's history to a byte budget: Window,
Salience) or "recalibrate". The session owns
the tensors and carries out the decision. All mutable state lives in a `PolicyState` held by the session, never on
the policy or on model modules, so one policy object can serve any number of sessions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

from ispa.cache import CacheLayout

__all__ = ["Action", "Phase", "Policy", "PolicyState"]

Phase = Literal["full", "warmup", "absorbed", "evicted", "recalibrating"]
Action = Literal["absorb", "recalibrate", "trim"]


@dataclass
class PolicyState:
    """One session's position in its policy's state machine."""

    phase: Phase
    frames_in_phase: int = 0  # latent frames generated since the phase began
    local_layers: tuple[int, ...] = ()
    recalibrations: int = 0
    recalibration_requested: bool = False
    reference_history_mass: list[float | None] | None = None  # per layer, measured in the block that absorbed
    drift_streak: int = 0  # consecutive blocks whose history-mass drift exceeded the threshold


class Policy(ABC):
    """Decides a session's phases; subclasses are dataclasses validated in `__post_init__`."""

    name: ClassVar[str]
    initial_phase: ClassVar[Phase]
    after_phase: ClassVar[Phase] = "absorbed"  # the phase after "absorb" or "trim"
    applies_delta: ClassVar[bool] = True  # whether an absorb gives its L-layers their ΔW (Evict: no)

    def new_state(self) -> PolicyState:
        return PolicyState(phase=self.initial_phase)

    def check_layout(self, layout: CacheLayout, num_layers: int) -> None:  # noqa: B027 (optional hook)
        """Raise ValueError if the policy cannot work with this layout (default: any layout works)."""

    def num_local_layers(self, num_layers: int) -> int:
        """How many layers an absorb turns local."""
        return 0

    def ridge_lambda(self) -> float:
        """The ridge regulariser of the absorb solve; only policies that absorb have one."""
        raise NotImplementedError(f"the {self.name!r} policy never absorbs")

    @abstractmethod
    def collects_statistics(self, state: PolicyState) -> bool:
        """Whether forwards in the current phase feed the absorption statistics."""

    @abstractmethod
    def decide(self, state: PolicyState, history_mass: list[float | None] | None) -> Action | None:
        """What to do at the end of a block; `state.frames_in_phase` already counts that block."""
