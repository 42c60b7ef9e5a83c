"""Sink plus the most recent history (StreamingLLM), in every layer, at ISPA's KV bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ispa.policies.budgeted import BudgetedPolicy, Retention

__all__ = ["WindowPolicy"]


@dataclass
class WindowPolicy(BudgetedPolicy):
    """After the warmup every layer keeps its sink and the newest history tokens that fit its share of ISPA's
    bytes (token-granular: at k_fraction 0.5 and a 3-block ring that is 1.5 blocks per ring)."""

    name: ClassVar[str] = "window"
    retention: ClassVar[Retention] = "newest"
