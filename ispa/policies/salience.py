"""Training-free heavy hitters (H2O-like), per layer and head, at ISPA's KV bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ispa.policies.budgeted import BudgetedPolicy, Retention

__all__ = ["SaliencePolicy"]


@dataclass
class SaliencePolicy(BudgetedPolicy):
    """Every history token accumulates the attention mass it receives (summed over the queries of every forward
    that sees it, normalised by that forward's fused log-sum-exp, so no second softmax is run). After the warmup,
    and after every later block, each layer and head keeps the history tokens with the largest accumulated mass
    that fit its share of ISPA's bytes. A block's own tokens enter with the mass its queries gave them as local
    keys. Costs one extra QKᵀ product over the history and the block per forward (no P·V).

    PaFu-KV learns a head to predict salience; that needs training, which this project cannot do.
    """

    name: ClassVar[str] = "salience"
    retention: ClassVar[Retention] = "mass"
