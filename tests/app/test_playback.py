"""Held segments reach the players in order, one per player per step, once the pacer says so; live speech is
never held back and gets its pace line."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.inputs import FULL, ISPA
from app.playback import Playback


class Spec:
    def __init__(self, speech_seconds: float | None) -> None:
        self.speech_seconds, self.max_area = speech_seconds, 400  # all of a RunSpec that playback reads


def test_held_segments_go_out_in_order_once_playback_can_run_to_the_end() -> None:
    playback = Playback([FULL, ISPA], Spec(8.0), [("big", 400)], margin_s=0.5)
    seg = [Path(f"s{i}.ts") for i in range(4)]
    playback.made(FULL, 2.0, 0.5)
    playback.made(ISPA, 2.0, 0.5)
    assert playback.due({FULL: None, ISPA: None}, 2.0) == []
    playback.made(FULL, 4.0, 1.5)  # 0.5 video s per wall s from the first chunk on
    assert playback.due({FULL: seg[0]}, 4.0) == []  # held: 4 + 6.5 / 0.5 - 6.5 is 10.5, plus the margin
    assert playback.note(4.0, live=False) == (
        "Buffering 7 s so playback will not stop (video is made at 0.50× real time)"
    )
    assert playback.wait_s(4.0) == 1.0  # the status counts down once a second
    assert playback.wait_s(10.2) == pytest.approx(0.8)  # then wakes when the hold runs out, chunk or not
    assert playback.note(10.6, live=False) is None  # the last 0.4 s of the hold: too short to be worth a line
    assert playback.due({}, 11.0) == [{FULL: seg[0]}]  # and hands it over then (10.5 plus the margin)
    playback = Playback([FULL, ISPA], Spec(8.0), [("big", 400)], margin_s=0.5)
    for run in (FULL, ISPA):
        playback.made(run, 2.0, 0.5)
    playback.made(FULL, 4.0, 1.5)
    assert playback.due({FULL: seg[0]}, 4.0) == []
    playback.made(FULL, 6.0, 2.5)
    playback.made(ISPA, 6.0, 4.5)
    assert playback.due({FULL: seg[1], ISPA: seg[2]}, 6.0) == [{ISPA: seg[2]}]  # ISPA: 1 video s per wall s
    playback.made(FULL, 12.0, 6.0)  # start: 12 + 2 / 0.55 - (8 - 3.5) is 11.1
    assert playback.due({FULL: seg[3]}, 12.0) == [{FULL: seg[0]}, {FULL: seg[1]}, {FULL: seg[3]}]
    assert playback.note(12.0, live=False) is None


def test_a_finished_run_hands_over_everything_and_live_speech_shows_its_pace() -> None:
    playback = Playback([ISPA], Spec(30.0), [("big", 400), ("small", 100)])
    playback.made(ISPA, 1.0, 1.0)
    playback.made(ISPA, 3.0, 2.0)
    assert playback.due({ISPA: Path("a.ts")}, 3.0) == []
    assert playback.due({}, 3.5, finished=True) == [{ISPA: Path("a.ts")}]
    live = Playback([ISPA], Spec(None), [("big", 400), ("small", 100)])
    live.made(ISPA, 1.0, 1.0)
    live.made(ISPA, 3.0, 2.0)
    assert live.due({ISPA: Path("b.ts")}, 3.0) == [{ISPA: Path("b.ts")}]
    assert live.note(3.0, live=True) == (
        "Video is made at 0.50× real time: the delay grows by 1.00 s per second of speech; the size small "
        "would keep up (by pixel count, an estimate)"
    )
