"""The stream segments of one request on their way to the players: each run's first segments are held back as
long as `app.pacing.StartPacer` says (speech of known length), then handed over in order; and the line the
status shows on it ("buffering 6 s so playback will not stop", or live mode's rate and growing delay)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from app.inputs import RunSpec
from app.pacing import HANDOVER_MARGIN_S, StartPacer, buffering_note, live_pace_note

NOTE_EVERY_S = 1.0
NOTED_HOLD_S = (
    0.5  # a shorter hold (timing jitter around real time) goes unremarked: "Buffering 1 s" would overstate it
)


class Playback:
    """Per run: its pacer, its held segments, the video seconds already cut into segments."""

    def __init__(
        self,
        runs: Sequence[str],
        spec: RunSpec,
        sizes: Sequence[tuple[str, int]],
        margin_s: float = HANDOVER_MARGIN_S,
    ) -> None:
        self.spec = spec
        self.sizes = list(sizes)
        self.pacers = {name: StartPacer(spec.speech_seconds, margin_s) for name in runs}
        self.held: dict[str, list[Path]] = {name: [] for name in runs}
        self._video_s = dict.fromkeys(runs, 0.0)
        self._cut_s = dict.fromkeys(runs, 0.0)

    def made(self, run: str, now_s: float, video_s: float) -> None:
        """`run` has `video_s` seconds of video at `now_s` (seconds since the request started)."""
        self.pacers[run].made(now_s, video_s)
        self._video_s[run] = video_s

    def due(
        self, segments: Mapping[str, Path | None], now_s: float, finished: bool = False
    ) -> list[dict[str, Path]]:
        """Take this step's new segments; return what goes to the players now, one dict per step to yield (each
        player gets one segment per step), in order. `finished`: every chunk is made, hand over the rest."""
        for run, path in segments.items():
            if path is None:
                continue
            self.pacers[run].segment(now_s, self._video_s[run] - self._cut_s[run])
            self._cut_s[run] = self._video_s[run]
            self.held[run].append(path)
        out: dict[str, list[Path]] = {}
        for run, pacer in self.pacers.items():
            if self.held[run] and pacer.release_due(now_s, finished):
                out[run], self.held[run] = self.held[run], []
        steps = max((len(paths) for paths in out.values()), default=0)
        return [{run: paths[i] for run, paths in out.items() if i < len(paths)} for i in range(steps)]

    def wait_s(self, now_s: float) -> float | None:
        """How long to wait for the next chunk before checking the holds again: until the first hold runs out, at
        most `NOTE_EVERY_S` (the status counts down); None (until the next chunk) when nothing is held."""
        holds = [self.pacers[run].hold_s(now_s) for run, paths in self.held.items() if paths]
        known = [hold for hold in holds if hold is not None]
        return max(0.0, min(*known, NOTE_EVERY_S)) if known else None

    def note(self, now_s: float, live: bool) -> str | None:
        """The status line on playback: why video is held back, or live mode's pace; None when nothing to say."""
        holding = [(pacer.hold_s(now_s), pacer) for run, pacer in self.pacers.items() if self.held[run]]
        holding = [(hold, pacer) for hold, pacer in holding if hold is not None and hold >= NOTED_HOLD_S]
        if holding:
            hold, pacer = max(holding, key=lambda item: item[0])
            return buffering_note(hold, pacer.rate())
        if live:
            rate = next(reversed(self.pacers.values())).rate()
            if rate is not None and len(next(reversed(self.pacers.values())).points) >= 2:
                return live_pace_note(rate, self.spec.max_area, self.sizes)
        return None
