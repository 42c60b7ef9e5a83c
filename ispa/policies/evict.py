"""The paper's "No Absorb" ablation: ISPA's warmup and layer choice, with the history simply dropped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ispa.policies.base import Phase
from ispa.policies.ispa import ISPAPolicy

__all__ = ["EvictPolicy"]


@dataclass
class EvictPolicy(ISPAPolicy):
    """Warms up and ranks layers by ε exactly as ISPA does, then frees the K best layers' history and leaves their
    output projection as it is (ΔW = 0). What it loses against ISPA is what ΔW recovers.

    Same parameters as `ISPAPolicy` (λ only shapes the ε ranking). The warmup costs what ISPA's does: the
    statistics are needed to rank the layers.
    """

    name: ClassVar[str] = "evict"
    applies_delta: ClassVar[bool] = False
    after_phase: ClassVar[Phase] = "evicted"
