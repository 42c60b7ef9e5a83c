"""What the server keeps per browser session: the running run's controls, its folder and final files, and the
live microphone feed.

Buttons such as Stop and Recalibrate are separate Gradio events, so they reach a running generator only
through state on the server. That state is keyed by Gradio's session hash and kept here rather than in
`gr.State`: Gradio deep-copies a State's initial value into each new session, and a handler only sees a State
value passed in as an input, so another event's handler could not reach a running generator's controls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from app.live_audio import LiveAudioFeed
from app.media import RunDir


class Controllable(Protocol):
    """What the app may ask of a running generation (the backend's `RunControl`)."""

    def cancel(self) -> None: ...

    def request_recalibration(self) -> None: ...


@dataclass
class FinalOutputs:
    """What a finished (or stopped) run hands over: files to download and the report shown as JSON."""

    files: list[Path]
    report: dict[str, Any]


@dataclass
class ActiveRun:
    run_dir: RunDir
    controls: list[Controllable] = field(default_factory=list)
    recalibrable: list[Controllable] = field(default_factory=list)  # the ISPA run(s) among `controls`
    finished: threading.Event = field(default_factory=threading.Event)
    final: FinalOutputs | None = None
    stop_requested: bool = False
    finished_at: float | None = None  # Sessions' clock

    def stop(self) -> None:
        self.stop_requested = True
        for control in self.controls:
            control.cancel()

    def recalibrate(self) -> int:
        """Ask the running ISPA generation(s) to recalibrate; returns how many were asked."""
        if self.finished.is_set():
            return 0
        for control in self.recalibrable:
            control.request_recalibration()
        return len(self.recalibrable)

    def finish(self, final: FinalOutputs | None) -> None:
        self.final = final
        self.finished.set()


@dataclass
class _Session:
    run: ActiveRun | None = None
    feed: LiveAudioFeed | None = None


class Sessions:
    """Thread-safe map from session hash to that session's run and live feed.

    A browser tab that closes ends its session (`end`), but API clients never say goodbye; so starting a run
    also forgets sessions whose last run finished more than `max_idle_seconds` ago, with their files.
    """

    def __init__(self, max_idle_seconds: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_idle_seconds = max_idle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}

    def begin_run(
        self,
        session: str,
        run_dir: RunDir,
        controls: Sequence[Controllable],
        recalibrable: Sequence[Controllable] = (),
    ) -> ActiveRun:
        """Register a new run; the session's previous run folder (already handed over) is removed."""
        run = ActiveRun(run_dir=run_dir, controls=list(controls), recalibrable=list(recalibrable))
        with self._lock:
            idle = self._idle_sessions(now=self._clock(), keep=session)
            state = self._sessions.setdefault(session, _Session())
            previous, state.run = state.run, run
        if previous is not None:
            previous.stop()
            previous.run_dir.cleanup()
        for state in idle:
            if state.run is not None:
                state.run.run_dir.cleanup()
        return run

    def finish(self, run: ActiveRun, final: FinalOutputs | None) -> None:
        """Record that `run` ended (normally, stopped or failed) with these outputs, waking a waiting Stop."""
        run.finished_at = self._clock()
        run.finish(final)

    def _idle_sessions(self, now: float, keep: str) -> list[_Session]:
        """Remove and return sessions (other than `keep`) idle for longer than `max_idle_seconds`."""
        idle = [
            name
            for name, state in self._sessions.items()
            if name != keep
            and state.run is not None
            and state.run.finished_at is not None
            and now - state.run.finished_at > self.max_idle_seconds
            and (state.feed is None or state.feed.closed)
        ]
        return [self._sessions.pop(name) for name in idle]

    def run(self, session: str) -> ActiveRun | None:
        with self._lock:
            state = self._sessions.get(session)
            return state.run if state else None

    def open_feed(self, session: str) -> LiveAudioFeed:
        """A fresh microphone feed for a new recording; any earlier one is closed."""
        feed = LiveAudioFeed()
        with self._lock:
            state = self._sessions.setdefault(session, _Session())
            previous, state.feed = state.feed, feed
        if previous is not None:
            previous.close()
        return feed

    def feed(self, session: str) -> LiveAudioFeed | None:
        with self._lock:
            state = self._sessions.get(session)
            return state.feed if state else None

    def end(self, session: str) -> None:
        """The browser tab closed: stop what runs, close the feed and delete the session's files."""
        with self._lock:
            state = self._sessions.pop(session, None)
        if state is None:
            return
        if state.feed is not None:
            state.feed.close()
        if state.run is not None:
            state.run.stop()
            state.run.run_dir.cleanup()


SESSIONS = Sessions()  # the process's one registry, shared by the app's event handlers
