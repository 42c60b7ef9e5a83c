"""What the server keeps per run owner: the running run's controls, its folder and final files, and the
live microphone feed.

Buttons such as Stop and Recalibrate are separate Gradio events, so they reach a running generator only
through state on the server. That state is keyed by the run's *owner token*, not by Gradio's session hash:
the session hash is chosen by the client and appears in URLs (`/stream/<session>/…`, `/heartbeat/<session>`),
so anyone who saw one could act on that session. The owner token travels only in request and response bodies:
the page gets one from a non-queued load event (`issue_token`), an API client makes its own (16 to 128 URL-safe
characters, e.g. `secrets.token_urlsafe(24)`) and passes it to /generate, /stop and /recalibrate. A run
started without a token gets a key nobody knows, so nobody can stop or recalibrate it.

Live mode is the page's alone: its events act only with a token issued to the page (session hash) that sends
them (`live_owner`), so a made-up token opens no feed.

Folders are removed when the owner starts its next run, when the page that owns them closes (`end_page`), and
by `sweep`: an API owner's finished run `api_keep_seconds` after it finished (API clients never say
goodbye), a page's `max_idle_seconds` after (a tab may sit open with its downloads). A microphone feed open for
longer than any recording lasts (`FEED_KEEP_SECONDS`) is closed by the sweep, so an owner whose page never
said it stopped recording is swept like any other.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from app.live_audio import LiveAudioFeed
from app.media import RunDir
from app.validation import MAX_AUDIO_SECONDS
from app.validation.errors import ValidationError

API_KEEP_SECONDS = 600.0  # an API owner's finished run: long enough to download its files
PAGE_KEEP_SECONDS = 3600.0  # a page's finished run when the page never said it closed
SWEEP_EVERY_SECONDS = 60.0
FEED_KEEP_SECONDS = MAX_AUDIO_SECONDS + 60.0  # a recording ends by then (Gradio's stream limit is 60 + 5 s)
TOKEN_BYTES = 24  # secrets.token_urlsafe(24): 32 characters
ANONYMOUS_PREFIX = "anonymous:"  # cannot pass check_token (':'), so no client can name such a key
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")


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
class _Owner:
    run: ActiveRun | None = None
    feed: LiveAudioFeed | None = None
    page: str | None = None  # the session hash of the page that was issued this token; None for API owners
    since: float = 0.0  # Sessions' clock: when the token was issued or first used
    feed_opened: float = 0.0  # Sessions' clock


class Sessions:
    """Thread-safe map from run owner (an owner token, see the module's docstring) to its run and live feed.

    `clock` is injectable so the clean-up bounds are tested without waiting.
    """

    def __init__(
        self,
        max_idle_seconds: float = PAGE_KEEP_SECONDS,
        api_keep_seconds: float = API_KEEP_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_idle_seconds = max_idle_seconds
        self.api_keep_seconds = api_keep_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._owners: dict[str, _Owner] = {}

    # ------------------------------------------------------------------------------------------ owners
    def issue_token(self, page: str) -> str:
        """A new owner token for the page with session hash `page` (sent back in a response body only)."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        with self._lock:
            self._owners[token] = _Owner(page=page, since=self._clock())
        self.sweep()
        return token

    def owner(self, token: Any) -> str:
        """The registry key of a request's owner token: the token itself, or for a request without one a fresh
        key that is never handed out (so that run cannot be reached by any later request)."""
        if token is None or token == "":
            return f"{ANONYMOUS_PREFIX}{secrets.token_urlsafe(TOKEN_BYTES)}"
        return check_token(token)

    def live_owner(self, token: Any, page: str) -> str | None:
        """The registry key of a live-mode request's owner token when that token was issued to the page with
        session hash `page`; None for any other token (made up, another page's, an API owner's, swept)."""
        if not isinstance(token, str) or not token:
            return None
        with self._lock:
            state = self._owners.get(token)
            return token if state is not None and state.page == page else None

    # -------------------------------------------------------------------------------------------- runs
    def begin_run(
        self,
        owner: str,
        run_dir: RunDir,
        controls: Sequence[Controllable],
        recalibrable: Sequence[Controllable] = (),
    ) -> ActiveRun:
        """Register `owner`'s new run; that owner's previous run folder (already handed over) is removed."""
        run = ActiveRun(run_dir=run_dir, controls=list(controls), recalibrable=list(recalibrable))
        with self._lock:
            state = self._owners.setdefault(owner, _Owner(since=self._clock()))
            previous, state.run = state.run, run
        if previous is not None:
            previous.stop()
            previous.run_dir.cleanup()
        self.sweep(keep=owner)
        return run

    def finish(self, run: ActiveRun, final: FinalOutputs | None) -> None:
        """Record that `run` ended (normally, stopped or failed) with these outputs, waking a waiting Stop."""
        run.finished_at = self._clock()
        run.finish(final)

    def run(self, owner: str) -> ActiveRun | None:
        with self._lock:
            state = self._owners.get(owner)
            return state.run if state else None

    # ----------------------------------------------------------------------------------------- clean-up
    def sweep(self, keep: str | None = None) -> int:
        """Forget owners (other than `keep`) whose last run finished long enough ago, with their folders, and
        page tokens never used within `max_idle_seconds`; returns how many owners were forgotten. A running
        run or an open microphone feed is never swept."""
        now = self._clock()
        with self._lock:
            stale_feeds = [
                state.feed
                for state in self._owners.values()
                if state.feed is not None and now - state.feed_opened > FEED_KEEP_SECONDS
            ]
        for feed in stale_feeds:
            feed.close()
        with self._lock:
            gone = [key for key, state in self._owners.items() if key != keep and self._expired(state, now)]
            states = [self._owners.pop(key) for key in gone]
        for state in states:
            if state.run is not None:
                state.run.run_dir.cleanup()
        return len(states)

    def _expired(self, state: _Owner, now: float) -> bool:
        if state.feed is not None and not state.feed.closed:
            return False
        keep = self.api_keep_seconds if state.page is None else self.max_idle_seconds
        if state.run is None:
            return now - max(state.since, state.feed_opened) > keep
        finished = state.run.finished_at
        return finished is not None and now - finished > keep

    def end_page(self, page: str) -> int:
        """The page with session hash `page` closed: stop what its owners run, close their feeds and delete
        their files. API owners are never ended this way. Returns how many owners were ended."""
        with self._lock:
            keys = [key for key, state in self._owners.items() if state.page == page]
            states = [self._owners.pop(key) for key in keys]
        for state in states:
            if state.feed is not None:
                state.feed.close()
            if state.run is not None:
                state.run.stop()
                state.run.run_dir.cleanup()
        return len(states)

    def owners(self) -> int:
        with self._lock:
            return len(self._owners)

    # -------------------------------------------------------------------------------------- live feeds
    def open_feed(self, owner: str) -> LiveAudioFeed:
        """A fresh microphone feed for a new recording; any earlier one is closed."""
        feed = LiveAudioFeed()
        with self._lock:
            state = self._owners.setdefault(owner, _Owner(since=self._clock()))
            previous, state.feed, state.feed_opened = state.feed, feed, self._clock()
        if previous is not None:
            previous.close()
        return feed

    def feed(self, owner: str) -> LiveAudioFeed | None:
        with self._lock:
            state = self._owners.get(owner)
            return state.feed if state else None


def check_token(token: Any) -> str:
    """An owner token as given by a client, checked: 16 to 128 letters, digits, '-' or '_'."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise ValidationError(
            "The owner token must be 16 to 128 letters, digits, '-' or '_' (for example from "
            "secrets.token_urlsafe(24)); leave it empty to start a run nobody else can control."
        )
    return token


def _sweep_forever(sessions: Sessions, every_seconds: float, stop: threading.Event) -> None:
    while not stop.wait(every_seconds):
        sessions.sweep()


def start_sweeper(sessions: Sessions, every_seconds: float = SWEEP_EVERY_SECONDS) -> threading.Event:
    """Sweep `sessions` every `every_seconds` on a daemon thread (so folders go even when no run starts);
    set the returned event to end it."""
    stop = threading.Event()
    threading.Thread(
        target=_sweep_forever, args=(sessions, every_seconds, stop), name="run-sweeper", daemon=True
    ).start()
    return stop


SESSIONS = Sessions()  # the process's one registry, shared by the app's event handlers
