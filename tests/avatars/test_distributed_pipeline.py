"""The timestep pipeline on torch.distributed (gloo, tiny model): K = 2, 3, 5 processes against one process.

Every layout runs the same block loop as one process, so these tests check what the ranks add: the transport and
the layouts. Full: chunks bit-identical (frames, audio, every report field but timings). ISPA: the same L-layers,
phases and events, and frames within ISPA_FRAME_TOLERANCE (the statistics are summed in another order across
ranks, so ΔW differs by float rounding). Cancel and recalibration are taken by rank 0 at the same block as in one
process. Two runs open at once (as compare mode runs them) each give their lone run's chunks.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from avatars.base import GenerationRequest
from avatars.liveavatar.distributed import PipelineLead, PipelineWorld, RankFailure
from avatars.liveavatar.distributed.channel import PeerChannel
from avatars.liveavatar.loading import build_tiny_pipeline
from avatars.liveavatar.rank_layout import RankLayout
from tests.fixtures.distributed_runs import (
    Scenario,
    run_keepalive_pair,
    run_pipeline,
    run_scenario,
    same_chunks,
)

ISPA_FRAME_TOLERANCE = 2  # of 255: the largest pixel difference allowed under ISPA
ISPA = (("k_fraction", 0.5), ("t_warm", 6))
FULL = Scenario("full")
# Recalibration asked at block 2 (absorbed), sink refreshed at block 4, absorbed again at the end of block 4.
RECALIBRATE = Scenario("ispa", ISPA, seconds=2.9, recalibrate_at=2, refresh_sink=True)
CANCEL = Scenario("full", seed=6, cancel_at=3)  # of the clip's 4 blocks, 3 run
FULL_REFRESH = Scenario("full", seconds=2.9, seed=7, refresh_sink=True)
LIVE = Scenario("full", seconds=2.0, seed=8, live=True)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


class OneProcessRuns(dict):
    """One-process chunks per scenario, each computed when a test first asks for it (so each test pays for its own
    scenarios, whatever runs before it)."""

    def __init__(self, pipe) -> None:
        super().__init__()
        self.pipe = pipe

    def __missing__(self, scenario: Scenario) -> list[dict]:
        self[scenario] = run_scenario(self.pipe.stream, scenario)
        return self[scenario]


@pytest.fixture(scope="module")
def single(pipe) -> OneProcessRuns:
    return OneProcessRuns(pipe)


@pytest.fixture(scope="module")
def latents(pipe, single):
    single[FULL]  # every scenario uses the same portrait: its encodes are handed to every rank 0
    return dict(pipe.portrait_latents._entries)


def assert_ispa_close(got: list[dict], want: list[dict]) -> None:
    assert [c["index"] for c in got] == [c["index"] for c in want]
    for g, w in zip(got, want, strict=True):
        for key in ("phase", "event", "l_layers", "recalibrations", "kv_bytes", "kv_bytes_per_layer"):
            assert g["report"][key] == w["report"][key], (g["index"], key)
        assert np.array_equal(g["audio"], w["audio"])
        diff = np.abs(g["frames"].astype(int) - w["frames"].astype(int)).max()
        assert diff <= ISPA_FRAME_TOLERANCE, (g["index"], diff)
        if w["report"]["epsilon"] is not None:
            np.testing.assert_allclose(
                [e for e in g["report"]["epsilon"] if e is not None],
                [e for e in w["report"]["epsilon"] if e is not None],
                rtol=1e-3,
            )


@pytest.mark.slow
def test_five_processes_four_dit_ranks_and_a_decoder(single, latents, tmp_path: Path):
    full, recalibrate = run_pipeline(5, [FULL, RECALIBRATE], tmp_path, portrait_latents=latents)
    assert same_chunks(full, single[FULL])
    assert_ispa_close(recalibrate, single[RECALIBRATE])  # warmup, absorb, recalibration, absorb again
    events = [c["report"]["event"] for c in recalibrate]
    assert events.count("absorbed") == 2 and "recalibration_started" in events


@pytest.mark.slow
def test_three_processes_with_cancel_then_live_speech(single, latents, tmp_path: Path):
    cancelled, live = run_pipeline(3, [CANCEL, LIVE], tmp_path, portrait_latents=latents)
    # One process hands out blocks 0-2; the pipeline (depth 2) had handed out block 0 when the cancel came, and
    # drops blocks 1-2, still being denoised on ranks 1-2. The next run on the same ranks is unaffected.
    assert len(single[CANCEL]) == 3
    assert same_chunks(cancelled, single[CANCEL][:1])
    # Live speech (pieces arriving while the run goes on) is read on rank 0 only, as one process reads it.
    assert same_chunks(live, single[LIVE])


@pytest.mark.slow
def test_two_dit_ranks_the_last_decoding_one_run_then_two_taking_turns(single, latents, tmp_path: Path):
    full, (refreshed, recalibrated) = run_pipeline(
        2,
        [FULL],
        tmp_path,
        portrait_latents=latents,
        decoder_on_last_dit=True,
        taking_turns=(FULL_REFRESH, RECALIBRATE),
    )
    assert same_chunks(full, single[FULL])
    # Both runs are open at once on every rank; their frames, reports and sink references do not mix (each
    # run's messages queue behind the other's, and every receiver takes its own run's).
    assert same_chunks(refreshed, single[FULL_REFRESH])
    assert_ispa_close(recalibrated, single[RECALIBRATE])


def test_one_dit_rank_hands_out_its_denoised_blocks_after_a_cancel_and_a_killed_rank_is_told(
    single, latents, tmp_path: Path
):
    # Rank 0 owns every step, rank 1 decodes. At the cancel, blocks 1-2 are fully denoised (only their decode is
    # left), so they go out as in one process. Then rank 1 dies at its 5th block (the next run's block 1); the
    # timeout is far beyond the 300 s the ranks are waited for, so ending at all means the failure was noticed
    # from the closed connection.
    cancelled, outcome, next_run = run_pipeline(
        2, [CANCEL, FULL], tmp_path, portrait_latents=latents, die=(1, 4), timeout_s=900
    )
    assert same_chunks(cancelled, single[CANCEL])
    assert isinstance(outcome, RankFailure)
    assert re.match(r"rank 1 stopped answering rank 0 \(", str(outcome)), outcome
    # The pipeline stays down: the next run is refused with the first failure's message, without waiting.
    assert isinstance(next_run, RankFailure)
    assert str(next_run).startswith("the pipeline is down since a rank failed (rank 1 stopped answering")


def test_layouts_for_each_process_count():
    assert [(lay.dit_ranks, lay.decoder_rank) for lay in map(RankLayout.for_world, (2, 3, 4, 5))] == [
        (1, 1),
        (2, 2),
        (4, 3),
        (4, 4),
    ]
    assert RankLayout.for_world(2, decoder_on_last_dit=True).steps(1) == range(2, 4)
    with pytest.raises(ValueError, match="cannot lay out the pipeline on 6 processes"):
        RankLayout.for_world(6)


@pytest.mark.slow
def test_a_follower_outlives_an_idle_lead_and_notices_a_silent_one(tmp_path: Path):
    # The follower waits at most 2 s for anything from upstream; the lead idles 3 s before its run (its
    # keep-alives carry the follower through), then goes silent: the follower fails within its wait.
    lead, follower = run_keepalive_pair(tmp_path, wait_s=2.0, idle_s=3.0)
    assert [c["index"] for c in lead["chunks"]] == [0]  # a 0.5 s clip: one block
    assert "nothing from upstream within 0:00:02" in follower["failure"]
    # The follower's 2 s wait starts at the lead's last message, which may precede `silent_at` (stamped once the
    # keep-alives stopped) by up to one keep-alive interval (a quarter of the wait): a failure during the idle 3 s
    # would come before `silent_at`.
    assert 2.0 - 2.0 / 4 <= follower["at"] - lead["silent_at"] <= 2.0 + 3.0


def test_the_step_count_must_split_equally_over_the_dit_ranks():
    assert RankLayout.for_world(3).steps(1, 2) == range(1, 2)  # 2 steps on 2 DiT ranks: one each
    assert RankLayout.for_world(2).steps(0, 3) == range(0, 3)  # 1 DiT rank runs any count
    with pytest.raises(ValueError, match=r"^steps: 3 denoising steps cannot be split over 2 DiT ranks .*"
                       r"choose 4 or 2 steps on this layout, or run 3 steps on 1 DiT rank"):  # fmt: skip
        RankLayout.for_world(3).steps(0, 3)
    with pytest.raises(ValueError, match=r"over 4 DiT ranks .* choose 4 steps .* run 2 steps on 1 or 2 DiT"):
        RankLayout.for_world(5).check_steps(2)


def test_the_lead_refuses_a_step_count_its_layout_cannot_split_before_anything_runs():
    world = PipelineWorld(0, RankLayout.for_world(5), PeerChannel(0), None, timedelta(seconds=5))
    lead = PipelineLead(
        build_tiny_pipeline(seed=0), world, keep_alive=False
    )  # no process group: nothing sent
    request = GenerationRequest(np.zeros((64, 64, 3), np.uint8), np.zeros(16000, np.float32), 16000, steps=3)
    with pytest.raises(ValueError, match="^steps: 3 denoising steps cannot be split over 4 DiT ranks"):
        lead.stream(request)
