"""One block's engine report for the whole run, from the parts its denoising stages report.

One process has one stage, whose report is the block's (merging one part changes nothing). Over several ranks, each
DiT rank's session holds the sink (replicated on every DiT rank) and the rings of its own steps only, so
the run's KV bytes are the sink once plus every rank's rings: exactly what one process holding all four rings
reports. The policy's state (phase, L-layers, ε, event, ΔW, statistics) moves in lockstep on every rank, so it
is taken from rank 0 after checking that the ranks agree; the history share comes from the last DiT rank, whose
sums were handed down the pipeline and so cover all four steps. Timings are summed over the ranks.
"""

from __future__ import annotations

from dataclasses import replace

from avatars.liveavatar.streaming.messages import StageReport
from ispa import BlockReport

__all__ = ["merge_stage_reports"]


def merge_stage_reports(parts: list[StageReport]) -> BlockReport:
    """`parts` in DiT-rank order, all for the same block."""
    first = parts[0].engine
    for rank, part in enumerate(parts):
        engine = part.engine
        if part.block != parts[0].block:
            raise RuntimeError(
                f"DiT rank {rank} reported block {part.block}, expected block {parts[0].block}"
            )
        mine = (engine.phase, engine.l_layers, engine.event, engine.recalibrations)
        if mine != (first.phase, first.l_layers, first.event, first.recalibrations):
            raise RuntimeError(
                f"DiT rank {rank} left block {part.block} in another state than rank 0: "
                f"{mine} vs {(first.phase, first.l_layers, first.event, first.recalibrations)}"
            )
    sink = parts[0].sink_bytes
    per_layer = [
        sink[layer] + sum(p.engine.kv_bytes_per_layer[layer] - p.sink_bytes[layer] for p in parts)
        for layer in range(len(sink))
    ]
    sink_total = sum(sink)

    def rings_only(value_of) -> int:
        return sink_total + sum(value_of(p.engine) - sum(p.sink_bytes) for p in parts)

    return replace(
        first,
        kv_bytes=sum(per_layer),
        kv_bytes_per_layer=per_layer,
        kv_bytes_full_ring=rings_only(lambda e: e.kv_bytes_full_ring),
        kv_bytes_full_unbounded=rings_only(lambda e: e.kv_bytes_full_unbounded),
        history_mass=parts[-1].engine.history_mass,
        merge_seconds=sum(p.engine.merge_seconds for p in parts),
        statistics_seconds=sum(p.engine.statistics_seconds for p in parts),
        absorb_seconds=sum(p.engine.absorb_seconds for p in parts),
    )
