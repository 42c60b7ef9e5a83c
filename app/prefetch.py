"""The backend's chunks made on a thread of their own, so that the time Gradio takes to hand each output over
(it encodes every stream segment with ffmpeg between two steps of the generator) does not hold up the model,
and so that held-back video can be released at its due time rather than at the next chunk."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
STOP_WAIT_SECONDS = 120.0  # a block in flight finishes before the thread can end (a 14B block: seconds)
AHEAD = 4  # steps made and not yet taken, at most: bounds what a slow consumer leaves waiting in memory


class Prefetch(Generic[T]):
    """Iterates `steps` on a daemon thread; `take` hands over what is made, each with `clock()` at the moment
    it was made."""

    def __init__(self, steps: Iterator[T], clock: Callable[[], float], on_stop: Callable[[], None]) -> None:
        self._steps, self._clock, self._on_stop = steps, clock, on_stop
        self._queue: queue.Queue[tuple[str, object]] = queue.Queue(AHEAD)
        self._stopping = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="chunk-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for step in self._steps:
                if not self._put(("step", (self._clock(), step))) or self._stopping.is_set():
                    return
            self._put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it in the request's thread
            self._put(("error", exc))

    def _put(self, item: tuple[str, object]) -> bool:
        """Queue `item`, waiting while the queue is full; False when a stop came meanwhile."""
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def take(self, timeout: float | None) -> tuple[float, T] | bool | None:
        """The next step made, with the time it was made, waiting up to `timeout` seconds (None: until one
        comes); False when none came in time; None once the steps are over. The producer's error is raised here."""
        if self._ended:
            return None
        try:
            kind, value = self._queue.get(timeout=timeout)
        except queue.Empty:
            return False
        if kind == "error":
            raise value  # type: ignore[misc]
        if kind == "end":
            self._ended = True
            return None
        return value  # type: ignore[return-value]

    def stop(self) -> bool:
        """Ask the steps to end (`on_stop`, e.g. cancel the runs) and wait for the thread; False when it is still
        inside a step after `STOP_WAIT_SECONDS` (its generators must not be closed then)."""
        self._stopping.set()
        self._on_stop()
        self._thread.join(STOP_WAIT_SECONDS)
        if self._thread.is_alive():
            logger.warning("the model's thread did not end within %.0f s of a stop", STOP_WAIT_SECONDS)
            return False
        return True
