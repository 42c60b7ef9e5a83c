"""A block's report from its stages' parts: one stage's part is the report itself (the one-process run); over
several DiT ranks the sink (held by each) counts once and every rank's rings count, the policy's state must agree,
the history share is the last rank's and the timings add up."""

from __future__ import annotations

import pytest

from avatars.liveavatar.streaming.messages import StageReport
from avatars.liveavatar.streaming.report_merge import merge_stage_reports
from ispa import BlockReport


def part(
    rings: list[int], *, sink: int = 100, mass: float = 0.5, block: int = 3, phase: str = "absorbed"
) -> StageReport:
    """A stage holding a sink of `sink` bytes and `rings[i]` ring bytes in layer i."""
    per_layer = [sink + ring for ring in rings]
    engine = BlockReport(
        index=block,
        phase=phase,
        kv_bytes=sum(per_layer),
        kv_bytes_per_layer=per_layer,
        kv_bytes_full_ring=sum(per_layer) + 10,
        kv_bytes_full_unbounded=sum(per_layer) + 20,
        stats_bytes=0,
        epsilon=[0.1, None],
        l_layers=[0],
        merge_seconds=0.25,
        absorb_seconds=0.5,
        history_mass=[mass, None],
        recalibrations=1,
        event=None,
        delta_weight_bytes=64,
        statistics_seconds=0.125,
    )
    return StageReport(run=1, block=block, engine=engine, sink_bytes=[sink] * len(rings), seconds=1.0)


def test_one_stage_is_the_block_report_itself() -> None:
    only = part([0, 40])
    assert merge_stage_reports([only]) == only.engine


def test_ranks_count_the_sink_once_and_every_ring() -> None:
    merged = merge_stage_reports([part([0, 40], mass=0.2), part([0, 30], mass=0.7)])
    assert merged.kv_bytes_per_layer == [100, 170]
    assert merged.kv_bytes == 270
    assert merged.kv_bytes_full_ring == 270 + 20 and merged.kv_bytes_full_unbounded == 270 + 40
    assert merged.history_mass == [0.7, None]  # the last rank's sums cover every step
    assert (merged.merge_seconds, merged.absorb_seconds, merged.statistics_seconds) == (0.5, 1.0, 0.25)
    assert merged.l_layers == [0] and merged.delta_weight_bytes == 64


def test_ranks_that_disagree_on_the_block_or_the_policy_state_are_an_error() -> None:
    with pytest.raises(RuntimeError, match="reported block 4"):
        merge_stage_reports([part([0, 1]), part([0, 1], block=4)])
    with pytest.raises(RuntimeError, match="another state"):
        merge_stage_reports([part([0, 1]), part([0, 1], phase="warmup")])
