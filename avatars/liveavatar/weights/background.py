"""The weights downloaded in a background thread while the app serves the tiny model, with its progress to show.

`BackgroundDownload(root).start()` runs `fetch.download_weights` once; `status()` is a snapshot any thread may
read: bytes done of the total, the rate of this run, the time left, and the failure in our words when it stopped.
A failed download leaves its partial files for the next start to continue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from avatars.liveavatar.weights.fetch import DownloadError, DownloadPlan, download_weights

logger = logging.getLogger(__name__)

RATE_AFTER_SECONDS = (
    2.0  # no rate (nor time left) before this much of the run: the first chunks say nothing yet
)
State = Literal["starting", "downloading", "checking", "ready", "failed"]


@dataclass(frozen=True)
class DownloadStatus:
    """Where a background download stands."""

    state: State
    done_bytes: int = 0
    total_bytes: int = 0
    bytes_per_second: float = 0.0
    error: str = ""

    @property
    def seconds_left(self) -> float | None:
        if self.bytes_per_second <= 0:
            return None
        return (self.total_bytes - self.done_bytes) / self.bytes_per_second

    def describe(self) -> str:
        """One line for people: what is happening, how far, how fast, how long still."""
        if self.state == "starting":
            return "listing the files to download"
        if self.state == "failed":
            return f"the download stopped: {self.error}"
        if self.state == "ready":
            return f"downloaded and checked ({self.total_bytes / 1e9:.1f} GB)"
        if self.state == "checking":
            return f"checking the downloaded files ({self.total_bytes / 1e9:.1f} GB)"
        line = f"downloading: {self.done_bytes / 1e9:.1f} of {self.total_bytes / 1e9:.1f} GB"
        if self.bytes_per_second > 0:
            line += f", {self.bytes_per_second / 1e6:.0f} MB/s"
        if (left := self.seconds_left) is not None:
            line += f", about {_duration(left)} left"
        return line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class BackgroundDownload:
    """One download of the weights into `root`, run in a daemon thread; `download` and `clock` replaceable in tests,
    `options` passed on to `download_weights`."""

    def __init__(
        self,
        root: str | Path,
        *,
        download: Callable[..., Any] = download_weights,
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> None:
        self.root = Path(root)
        self._download, self._clock, self._options = download, clock, options
        self._lock = threading.Lock()
        self._status = DownloadStatus("starting")
        self._started_at = 0.0
        self._fetched = 0  # bytes written by this run (the rate's numerator)
        self._thread: threading.Thread | None = None

    def start(self) -> BackgroundDownload:
        self._thread = threading.Thread(target=self._run, name="weights-download", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """True once the download has ended (ready or failed)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status().state in ("ready", "failed")

    def status(self) -> DownloadStatus:
        with self._lock:
            return self._status

    def _run(self) -> None:
        try:
            self._download(self.root, on_plan=self._planned, on_bytes=self._fetched_bytes, **self._options)
        except DownloadError as err:
            self._set(state="failed", error=str(err))
            logger.warning("weights download stopped: %s", err)
        except (
            Exception
        ) as err:  # anything else must not end the app; it is said, and the tiny model serves on
            self._set(state="failed", error=f"{type(err).__name__}: {err}")
            logger.exception("weights download failed")
        else:
            with self._lock:
                self._status = DownloadStatus(
                    "ready", self._status.total_bytes, self._status.total_bytes, self._status.bytes_per_second
                )
            logger.info("weights downloaded and checked in %s", self.root)

    def _planned(self, plan: DownloadPlan) -> None:
        self._started_at = self._clock()
        self._set(state="downloading" if plan.left_bytes else "checking", done_bytes=plan.done_bytes,
                  total_bytes=plan.total_bytes)  # fmt: skip

    def _fetched_bytes(self, count: int) -> None:
        with self._lock:
            self._fetched += count
            done = self._status.done_bytes + count
            elapsed = self._clock() - self._started_at
            rate = self._fetched / elapsed if elapsed >= RATE_AFTER_SECONDS else 0.0
            state: State = "checking" if done >= self._status.total_bytes else "downloading"
            self._status = DownloadStatus(state, done, self._status.total_bytes, rate)

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._status = DownloadStatus(**{**self._status.__dict__, **changes})
