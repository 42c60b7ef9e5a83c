"""Timing spans of GPU work without a host sync per span.

On CUDA each span records a pair of events on the current stream and the durations are read once, when the
caller asks for the total (one sync per generated block instead of one per layer). On CPU spans use perf_counter.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["SpanTimer"]


class SpanTimer:
    """Accumulates the duration of code spans until `pop_seconds` reads and clears the total."""

    def __init__(self) -> None:
        self._host_seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def span(self, device: torch.device) -> Iterator[None]:
        """Time the enclosed code; on CUDA, the device work it enqueues on the current stream."""
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                self._pending.append((start, end))
        else:
            begin = time.perf_counter()
            try:
                yield
            finally:
                self._host_seconds += time.perf_counter() - begin

    def pop_seconds(self) -> float:
        """Total seconds of all spans since the last call (waits for the last CUDA span to finish)."""
        total = self._host_seconds
        if self._pending:
            self._pending[-1][1].synchronize()
            total += sum(start.elapsed_time(end) for start, end in self._pending) / 1000.0
        self._host_seconds = 0.0
        self._pending = []
        return total
