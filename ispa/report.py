"""What the engine tells the app and the benchmarks after every generated block."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["BlockReport"]


@dataclass(frozen=True)
class BlockReport:
    """State of one session after one generated block.

    Attributes
    ----------
    index : block number, from 0.
    phase : the phase the block was generated in: "warmup", "absorbed" or "recalibrating" (ISPA), "full" (Full),
        "evicted" (Evict, Window and Salience after their warmup).
        A transition triggered at the block's end shows in `event`, not here.
    kv_bytes, kv_bytes_per_layer : KV bytes held after the block (and after its transition), from live tensors.
    kv_bytes_full_ring : what a Full session with the same layout and KV storage would hold at this point (ring
        slots counted as they are written, up to the ring's length).
    kv_bytes_full_unbounded : sink plus every block ever written, i.e. a history with no ring bound.
    stats_bytes : bytes of absorption statistics held while the block ran (an absorb at its end frees them).
    epsilon : per-layer reconstruction error of the latest absorb (None for layers without statistics), or None
        before the first absorb.
    l_layers : sorted indices of the local layers after the block.
    merge_seconds : time spent in LSE merges during the block.
    statistics_seconds : time spent accumulating absorption statistics during the block (warmup/recalibration).
    absorb_seconds : time of the absorb step, 0 unless it ran at this block's end.
    history_mass : per layer, the mean share of softmax mass that went to history during the block (None for
        layers that attended to no history); None when no layer did.
    recalibrations : recalibrations started so far.
    event : None, "absorbed" or "recalibration_started".
    delta_weight_bytes : bytes of the L-layers' ΔW this session holds (applied as their own product).
    """

    index: int
    phase: str
    kv_bytes: int
    kv_bytes_per_layer: list[int]
    kv_bytes_full_ring: int
    kv_bytes_full_unbounded: int
    stats_bytes: int
    epsilon: list[float | None] | None
    l_layers: list[int]
    merge_seconds: float
    absorb_seconds: float
    history_mass: list[float | None] | None
    recalibrations: int
    event: str | None
    delta_weight_bytes: int = 0
    statistics_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite floats become None)."""
        return {key: _json_safe(value) for key, value in asdict(self).items()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
