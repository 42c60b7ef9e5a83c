"""How much a public Space lets anonymous clients write to its disk: per request, per client over a window, and
in all (the temp folder that holds uploads and run folders).

Gradio's own `max_file_size` bounds each file, so one request with several files, or many requests, could still
fill the disk. `app.request_guard` applies these budgets to every request body before Gradio reads it; the
refusals here are the messages the client gets. A client's budget counts files as well as bytes (many tiny files
cost the server more than their bytes say). The temp folder's size is kept by `TempUsage`: walked once, then
again in the background every few seconds, with each accepted upload added in between, so no request waits for a
walk of the folder.
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
    client_files: int = 300  # per client within `client_window_seconds`
    temp_budget_bytes: int = 4096 * MB  # uploads plus run folders, everything under the temp folder
    min_free_bytes: int = 1024 * MB  # left free on the temp folder's disk after an upload

    @classmethod
    def from_environment(cls) -> UploadLimits:
        """The defaults, with the temp budget from ISPA_TEMP_BUDGET_MB when set (a Space with a larger disk)."""
        budget = os.environ.get("ISPA_TEMP_BUDGET_MB")
        return cls(temp_budget_bytes=int(budget) * MB) if budget else cls()

    def client_budget(self, clock: Callable[[], float] = time.monotonic) -> ClientBudget:
        return ClientBudget(self.client_bytes, self.client_window_seconds, self.client_files, clock=clock)


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
    """Bytes and files each client uploaded within the last `window_seconds`; a request over either budget is
    refused."""

    def __init__(
        self,
        limit_bytes: int,
        window_seconds: float,
        limit_files: int = UploadLimits.client_files,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit_bytes = limit_bytes
        self.limit_files = limit_files
        self.window_seconds = window_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._spent: dict[str, deque[tuple[float, int, int]]] = {}  # (when, bytes, files)

    def spend(self, client: str, nbytes: int, files: int = 0) -> str | None:
        """Count `nbytes` and `files` for `client` and return None, or return the refusal and count nothing."""
        now = self._clock()
        with self._lock:
            self._forget_before(now - self.window_seconds)
            spent = self._spent.setdefault(client, deque())
            used = sum(n for _, n, _ in spent)
            used_files = sum(f for _, _, f in spent)
            wait = self.window_seconds - (now - spent[0][0]) if spent else self.window_seconds
            retry = f"Please try again in {max(1, round(wait / 60))} minute(s)."
            minutes = f"{self.window_seconds / 60:.0f} minutes"
            if used + nbytes > self.limit_bytes:
                return (
                    f"You have uploaded {_mb(used)} in the last {minutes}; a client may upload "
                    f"{_mb(self.limit_bytes)} in that time. {retry}"
                )
            if files and used_files + files > self.limit_files:
                return (
                    f"You have uploaded {used_files} files in the last {minutes}; a client may upload "
                    f"{self.limit_files} files in that time. {retry}"
                )
            if nbytes or files:
                spent.append((now, nbytes, files))
            return None

    def add_files(self, client: str, files: int) -> None:
        """Count `files` more for `client` without a check (the rest of a request already let in)."""
        if files > 0:
            with self._lock:
                self._spent.setdefault(client, deque()).append((self._clock(), 0, files))

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


class TempUsage:
    """The temp folder's size without walking it per request: one walk when the folder is first asked about (or
    has changed), later walks on a background thread once the last is `every_seconds` old, and the bytes of each
    accepted upload added in between (counted again by the next walk that sees them, so the estimate errs high)."""

    def __init__(
        self,
        root: Callable[[], Path],
        every_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = root
        self.every_seconds = every_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._walked_root: Path | None = None
        self._walked_bytes = 0
        self._walked_at = 0.0
        self._added = 0  # bytes accepted since the current walk's result began
        self._walking = False

    def used(self) -> int:
        """Bytes under the folder, as last walked plus what was added since."""
        root = self._root()
        with self._lock:
            fresh = self._walked_root == root
            if fresh and not self._walking and self._clock() - self._walked_at > self.every_seconds:
                self._walking = True
                threading.Thread(target=self._walk, args=(root,), name="temp-usage", daemon=True).start()
        if not fresh:  # first use of this folder: walked here, once
            self.refresh()
        with self._lock:
            return self._walked_bytes + self._added

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._added += nbytes

    def refresh(self) -> None:
        """Walk the folder now, on this thread (at start-up, before any request)."""
        with self._lock:
            self._walking = True
        self._walk(self._root())

    def _walk(self, root: Path) -> None:
        with self._lock:
            added_before = self._added
        try:
            total = folder_bytes(root)
        finally:
            with self._lock:
                self._walked_root, self._walked_bytes, self._walked_at = root, total, self._clock()
                self._added -= added_before  # what came in during the walk stays on top
                self._walking = False


def disk_refusal(root: Path, nbytes: int, limits: UploadLimits, used: int | None = None) -> str | None:
    """Why writing `nbytes` more under `root` is refused (the budget or the disk's free space), or None; `used` is
    the folder's size when known (`TempUsage`), else it is walked."""
    used = folder_bytes(root) if used is None else used
    free = shutil.disk_usage(root).free
    if used + nbytes > limits.temp_budget_bytes or free - nbytes < limits.min_free_bytes:
        return (
            "The server's temporary storage is full right now (uploads and videos of recent runs); "
            "please try again in a few minutes."
        )
    return None
