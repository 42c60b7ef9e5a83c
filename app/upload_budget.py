"""How much a public Space lets anonymous clients write to its disk: per request, per client over a window, and
in all (the temp folder that holds uploads and run folders).

Gradio's own `max_file_size` bounds each file, so one request with several files, or many requests, could still
fill the disk. `app.request_guard` applies these budgets to every request body before Gradio reads it; the
refusals here are the messages the client gets.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MB = 1024 * 1024  # as Gradio parses "50mb"
MAX_FILE_MB = 50
MULTIPART_SLACK_BYTES = 64 * 1024  # form boundaries and headers around one file


@dataclass(frozen=True)
class UploadLimits:
    request_bytes: int = MAX_FILE_MB * MB + MULTIPART_SLACK_BYTES  # one file's worth per request, in all
    client_bytes: int = 200 * MB  # per client within `client_window_seconds`
    client_window_seconds: float = 600.0
    temp_budget_bytes: int = 4096 * MB  # uploads plus run folders, everything under the temp folder
    min_free_bytes: int = 1024 * MB  # left free on the temp folder's disk after an upload

    @classmethod
    def from_environment(cls) -> UploadLimits:
        """The defaults, with the temp budget from ISPA_TEMP_BUDGET_MB when set (a Space with a larger disk)."""
        budget = os.environ.get("ISPA_TEMP_BUDGET_MB")
        return cls(temp_budget_bytes=int(budget) * MB) if budget else cls()


def _mb(n: float) -> str:
    return f"{n / MB:.0f} MB"


def request_refusal(declared: int | None, limits: UploadLimits) -> str | None:
    """Why a request body of `declared` bytes (None: no Content-Length) is refused, or None."""
    if declared is None:
        return "Uploads must say their size (a Content-Length header); chunked uploads are not accepted."
    if declared > limits.request_bytes:
        return (
            f"This request carries {_mb(declared)}, more than the {_mb(limits.request_bytes - MULTIPART_SLACK_BYTES)} "
            "one request may upload in all (files are counted together). Upload the portrait and the speech "
            "one at a time, or make them smaller."
        )
    return None


class ClientBudget:
    """Bytes each client uploaded within the last `window_seconds`; a request over the budget is refused."""

    def __init__(
        self, limit_bytes: int, window_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit_bytes = limit_bytes
        self.window_seconds = window_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._spent: dict[str, deque[tuple[float, int]]] = {}

    def spend(self, client: str, nbytes: int) -> str | None:
        """Count `nbytes` for `client` and return None, or return the refusal and count nothing."""
        now = self._clock()
        with self._lock:
            self._forget_before(now - self.window_seconds)
            spent = self._spent.setdefault(client, deque())
            used = sum(n for _, n in spent)
            if used + nbytes > self.limit_bytes:
                wait = self.window_seconds - (now - spent[0][0]) if spent else self.window_seconds
                return (
                    f"You have uploaded {_mb(used)} in the last {self.window_seconds / 60:.0f} minutes; a client "
                    f"may upload {_mb(self.limit_bytes)} in that time. Please try again in "
                    f"{max(1, round(wait / 60))} minute(s)."
                )
            if nbytes:
                spent.append((now, nbytes))
            return None

    def _forget_before(self, cutoff: float) -> None:
        for client in list(self._spent):
            spent = self._spent[client]
            while spent and spent[0][0] < cutoff:
                spent.popleft()
            if not spent:
                del self._spent[client]


def folder_bytes(root: Path) -> int:
    """Bytes of the regular files under `root` (links are not followed; files that vanish are skipped)."""
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def disk_refusal(root: Path, nbytes: int, limits: UploadLimits) -> str | None:
    """Why writing `nbytes` more under `root` is refused (the budget or the disk's free space), or None."""
    used = folder_bytes(root)
    free = shutil.disk_usage(root).free
    if used + nbytes > limits.temp_budget_bytes or free - nbytes < limits.min_free_bytes:
        return (
            "The server's temporary storage is full right now (uploads and videos of recent runs); "
            "please try again in a few minutes."
        )
    return None
