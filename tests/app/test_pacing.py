"""The pacing arithmetic against a brute-force simulation of a player: a run makes video at a constant rate in
segments; the least start that never stalls is the largest (segment ready - segment start). The pacer must start
no earlier (no stall) and, below real time, no later than one chunk's production after it; at or above real time
it adds no delay."""

from __future__ import annotations

import pytest

from app.pacing import (
    HANDOVER_MARGIN_S,
    StartPacer,
    buffering_note,
    live_pace_note,
    production_rate,
    size_that_keeps_up,
    start_time,
)


def simulated_run(rate: float, total_s: float, chunk_s: float, per_segment: int, setup_s: float):
    """(chunk end wall times, segments as (ready wall time, media start, media end)) of a run that spends
    `setup_s`, then makes `chunk_s` of video every `chunk_s / rate` seconds, `per_segment` chunks a segment."""
    chunks = round(total_s / chunk_s)
    made_at = [setup_s + (i + 1) * chunk_s / rate for i in range(chunks)]
    segments = []
    for first in range(0, chunks, per_segment):
        last = min(first + per_segment, chunks) - 1
        segments.append((made_at[last], first * chunk_s, (last + 1) * chunk_s))
    return made_at, segments


def least_start(segments: list[tuple[float, float, float]]) -> float:
    return max(ready - start for ready, start, _ in segments)


def stalls(start: float, segments: list[tuple[float, float, float]]) -> bool:
    return any(ready > start + media_start + 1e-9 for ready, media_start, _ in segments)


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("total_s", [4.0, 16.0])
def test_below_real_time_the_start_is_exactly_the_least_that_never_stalls(
    rate: float, total_s: float
) -> None:
    made_at, segments = simulated_run(rate, total_s, chunk_s=0.5, per_segment=2, setup_s=3.0)
    first_ready, _, first_end = segments[0]
    planned = start_time(
        now_s=first_ready,
        made_s=first_end,
        total_s=total_s,
        rate=rate,
        longest_segment_s=1.0,
        first_ready_s=first_ready,
    )
    assert planned == pytest.approx(least_start(segments))
    assert not stalls(planned, segments)
    assert stalls(planned - 0.05, segments)


@pytest.mark.parametrize("rate", [1.0, 2.0])
def test_at_or_above_real_time_nothing_is_held_back(rate: float) -> None:
    made_at, segments = simulated_run(rate, 16.0, chunk_s=0.5, per_segment=2, setup_s=3.0)
    first_ready, _, first_end = segments[0]
    planned = start_time(
        now_s=first_ready,
        made_s=first_end,
        total_s=16.0,
        rate=rate,
        longest_segment_s=1.0,
        first_ready_s=first_ready,
        margin_s=HANDOVER_MARGIN_S,
    )
    assert planned == first_ready  # no added delay
    assert not stalls(planned, segments)
    pacer = feed(StartPacer(16.0), made_at, segments, chunk_s=0.5, until=first_ready)
    assert pacer.release_due(first_ready) and pacer.hold_s(first_ready) == 0


def feed(pacer: StartPacer, made_at, segments, chunk_s: float, until: float) -> StartPacer:
    ready = {round(r, 9): end - start for r, start, end in segments}
    for i, wall in enumerate(made_at):
        if wall > until:
            break
        pacer.made(wall, (i + 1) * chunk_s)
        if round(wall, 9) in ready:
            pacer.segment(wall, ready[round(wall, 9)])
    return pacer


@pytest.mark.parametrize("margin", [0.0, 0.5, HANDOVER_MARGIN_S])
@pytest.mark.parametrize("rate", [0.3, 0.5, 0.8])
def test_the_pacer_releases_at_the_first_chunk_past_the_least_start(rate: float, margin: float) -> None:
    """Re-estimated chunk by chunk (the first chunk, slowed by set-up, only counts until a second is in): the
    release is never before the least start (plus the margin) and at most one chunk's production after it."""
    chunk_s, total_s = 0.5, 8.0
    made_at, segments = simulated_run(rate, total_s, chunk_s, per_segment=2, setup_s=3.0)
    released_at = None
    for wall in made_at:
        if feed(StartPacer(total_s, margin), made_at, segments, chunk_s, until=wall).release_due(wall):
            released_at = wall
            break
    assert released_at is not None
    least = least_start(segments)
    assert least + margin <= released_at <= least + margin + chunk_s / rate + 1e-9
    assert not stalls(released_at, segments)


def test_the_margin_is_the_delay_at_most_so_it_fades_out_near_real_time() -> None:
    """4 s to make, the first 1.28 s segment ready at 5 s: the least start is 5 + 2.72 / r - 2.72."""
    ask = {"total_s": 4.0, "longest_segment_s": 1.28, "first_ready_s": 5.0, "margin_s": 1.0}
    least = 5.0 + 2.72 / 0.5 - 2.72
    assert start_time(now_s=5.0, made_s=1.28, rate=0.5, **ask) == pytest.approx(
        least + 1.0
    )  # the whole margin
    # Asked again a second later with that second's production: the same start, the margin does not shrink.
    assert start_time(now_s=6.0, made_s=1.78, rate=0.5, **ask) == pytest.approx(least + 1.0)
    delay = 2.72 / 0.99 - 2.72  # 0.027 s: timing jitter around real time
    assert start_time(now_s=5.0, made_s=1.28, rate=0.99, **ask) == pytest.approx(5.0 + 2 * delay)
    assert start_time(now_s=5.0, made_s=1.28, rate=1.0, **ask) == 5.0


def test_before_a_second_chunk_the_rate_counts_from_the_start_and_a_finished_run_releases() -> None:
    pacer = StartPacer(10.0, margin_s=0.0)
    pacer.made(4.0, 1.0)  # 3 s of set-up, then a 1 s chunk
    assert pacer.rate() == pytest.approx(0.25)
    pacer.made(6.0, 2.0)
    assert pacer.rate() == pytest.approx(0.5)  # from the first chunk on
    assert pacer.hold_s(6.0) is None  # no segment yet
    pacer.segment(6.0, 2.0)
    assert pacer.hold_s(6.0) == pytest.approx((10 - 2) / 0.5 - (10 - 2))
    assert not pacer.release_due(6.0)
    assert pacer.release_due(6.5, finished=True)
    assert StartPacer(None).release_due(0.0) is False  # no segment yet
    live = StartPacer(None)
    live.made(1.0, 0.5)
    live.segment(1.0, 0.5)
    assert live.release_due(1.0)  # live speech is never held back


def test_rates_and_notes() -> None:
    assert production_rate([(1.0, 0.0)]) is None
    assert production_rate([(1.0, 0.0), (1.0, 2.0)]) is None
    assert production_rate([(1.0, 0.5), (5.0, 2.5)]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="rate"):
        start_time(now_s=0, made_s=0, total_s=1, rate=0, longest_segment_s=1, first_ready_s=0)
    assert (
        buffering_note(5.6, 0.5)
        == "Buffering 6 s so playback will not stop (video is made at 0.50× real time)"
    )


def test_the_size_that_keeps_up_is_the_largest_whose_scaled_rate_reaches_real_time() -> None:
    sizes = [("big", 400), ("mid", 200), ("small", 100)]
    assert size_that_keeps_up(0.5, 400, sizes) == "mid"  # 0.5 × 400 / 200 = 1.0
    assert size_that_keeps_up(0.3, 400, sizes) == "small"
    assert size_that_keeps_up(0.2, 400, sizes) is None
    assert size_that_keeps_up(1.5, 400, sizes) == "big"
    note = live_pace_note(0.5, 400, sizes)
    assert "0.50× real time" in note and "grows by 1.00 s per second of speech" in note and "mid" in note
    assert "no size" in live_pace_note(0.2, 400, sizes)
    assert "keeps up" in live_pace_note(1.0, 400, sizes)
