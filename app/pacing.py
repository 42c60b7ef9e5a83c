"""When a run's first video segment may go to the player so that playback never stops, and how far live video
falls behind: pure arithmetic on the production measured so far (no clock, no I/O; times are seconds since the
run started, video is seconds of media).

Known speech length (`StartPacer`). The rate r is the video made per second of wall time, measured from the first
chunk on (set-up is not production); before a second chunk it counts from the run's start, which is slower and
so on the safe side. The player starts at P and needs the segment [s, e] at P + s; made at rate r from now, it
is ready at now + (e - made) / r. So P must be at least now + (e - made) / r - s for every segment still to
come, and with s >= e - L (L: the longest segment so far):

    P >= now + (e - made) / r - e + L

Below real time (r < 1) the right side grows with e, so the last segment (e = total) decides:

    P = now + (total - made) / r - (total - L)

At or above real time it shrinks with e, so the next segment decides, which is ready before the one now
playing ends: P = the moment the first segment is ready, no delay added. Below real time the pacer adds a
margin to P: the delay itself (P's distance past the moment the first segment was ready), at most
`HANDOVER_MARGIN_S`. It covers two things. A segment reaches the player a little after the app hands it over:
Gradio encodes it, the page gets the update and loads the playlist and the segment (0.05-0.5 s from hand-over to
the playlist load in the Chromium test on a 2-core machine), and not always equally fast. And the rate measured
so far may overestimate the rest. With no margin that test released 0.24 s before the least start and stalled
0.27 s; with 0.5 s, two runs did not stall. The margin is capped by the delay so that it fades out as the rate
nears real time, where the delay, and what an error in the rate can add to it, tend to nothing: a run measured
at 0.99× real time (timing jitter at 1×) is held back about 2 × 0.01 × the rest, not a whole margin. The
estimate is renewed with every chunk until the segments are released; released segments stay released.

Live speech (`live_pace_note`): speech arrives in real time, so at a rate r < 1 the delay behind the speaker
grows by 1 / r - 1 seconds per second of speech. The size that keeps up is estimated by pixel count (work
taken as proportional to it: an estimate, attention grows faster than that).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

HANDOVER_MARGIN_S = 1.0  # seconds added to a held start below real time (see the module)


def production_rate(points: Sequence[tuple[float, float]]) -> float | None:
    """Video seconds made per wall second between the first and the last (wall_s, video_s) point; None with
    fewer than two points or no time between them."""
    if len(points) < 2:
        return None
    (wall0, video0), (wall1, video1) = points[0], points[-1]
    if wall1 <= wall0:
        return None
    return (video1 - video0) / (wall1 - wall0)


def start_time(
    *,
    now_s: float,
    made_s: float,
    total_s: float,
    rate: float,
    longest_segment_s: float,
    first_ready_s: float,
    margin_s: float = 0.0,
) -> float:
    """The earliest wall time (s since the run's start) playback may begin so that, making the rest at `rate`,
    every segment is ready before the player reaches it, plus a margin: the delay past `first_ready_s` (when the
    first segment was ready), at most `margin_s`. `now_s` when nothing needs holding back, as at or above real
    time (see the module)."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if rate >= 1 or made_s >= total_s:
        return now_s
    least = now_s + (total_s - made_s) / rate - (total_s - longest_segment_s)
    delay = least - first_ready_s
    return max(now_s, least + min(margin_s, delay)) if delay > 0 else now_s


@dataclass
class StartPacer:
    """Holds back one run's first segments until `start_time` says playback can run to the end without stopping.

    Feed it every chunk (`made`) and every segment (`segment`); `release_due(now)` says when to hand the held
    segments over. `total_s` None (live speech) never holds anything back."""

    total_s: float | None
    margin_s: float = HANDOVER_MARGIN_S
    points: list[tuple[float, float]] = field(default_factory=list)
    longest_segment_s: float = 0.0
    first_ready_s: float | None = None
    released: bool = False

    def made(self, wall_s: float, video_s: float) -> None:
        """`video_s` seconds of video existed at `wall_s`."""
        self.points.append((wall_s, video_s))

    def segment(self, wall_s: float, seconds: float) -> None:
        """A segment of `seconds` became ready at `wall_s`."""
        if self.first_ready_s is None:
            self.first_ready_s = wall_s
        self.longest_segment_s = max(self.longest_segment_s, seconds)

    def rate(self) -> float | None:
        """Measured from the first chunk on; from the run's start (0, 0) while only one chunk is in."""
        if len(self.points) == 1:
            return production_rate([(0.0, 0.0), *self.points])
        return production_rate(self.points)

    def start_s(self, now_s: float) -> float | None:
        """When playback may start, as far as is known at `now_s` (at or before it: at once); None before the
        first segment."""
        if self.first_ready_s is None:
            return None
        rate = self.rate()
        if self.total_s is None or rate is None or not self.points:
            return now_s
        if rate <= 0:
            return None  # nothing made yet since the first chunk: no estimate, keep holding
        last_s, made = self.points[-1]  # production goes on from the last chunk, whenever this is asked
        return start_time(
            now_s=last_s,
            made_s=made,
            total_s=self.total_s,
            rate=rate,
            longest_segment_s=self.longest_segment_s,
            first_ready_s=self.first_ready_s,
            margin_s=self.margin_s,
        )

    def hold_s(self, now_s: float) -> float | None:
        """Seconds still to hold the segments back at `now_s` (0: release them now); None before any segment or
        without an estimate yet."""
        if self.released:
            return 0.0
        start = self.start_s(now_s)
        return None if start is None else start - now_s

    def release_due(self, now_s: float, finished: bool = False) -> bool:
        """True once the held segments may go to the player (always once every chunk is made)."""
        if not self.released and self.first_ready_s is not None:
            hold = self.hold_s(now_s)
            self.released = finished or (hold is not None and hold <= 0)
        return self.released or finished


def buffering_note(hold_s: float, rate: float | None) -> str:
    """The status line while segments are held back."""
    note = f"Buffering {math.ceil(hold_s)} s so playback will not stop"
    if rate is not None:
        note += f" (video is made at {rate:.2f}× real time)"
    return note


def size_that_keeps_up(rate: float, area: int, sizes: Sequence[tuple[str, int]]) -> str | None:
    """The largest size whose estimated rate (`rate` scaled by pixel count from `area`) reaches real time; None
    when none does."""
    fitting = [(other, label) for label, other in sizes if rate * area / other >= 1]
    return max(fitting)[1] if fitting else None


def live_pace_note(rate: float, area: int, sizes: Sequence[tuple[str, int]]) -> str:
    """Live mode's line on speed: the rate against real time, how the delay grows, the size that would keep up."""
    if rate >= 1:
        return f"Video is made at {rate:.2f}× real time: it keeps up with the speech"
    note = f"Video is made at {rate:.2f}× real time: the delay grows by {1 / rate - 1:.2f} s per second of speech"
    faster = size_that_keeps_up(rate, area, sizes)
    if faster is None:
        return note + "; no size of this model keeps up (by pixel count, an estimate)"
    return note + f"; the size {faster} would keep up (by pixel count, an estimate)"
