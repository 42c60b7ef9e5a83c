"""The one-process end of the block loop: every step ran here, so a block is decoded here and its chunk is built
from this process's report alone.

With `overlap` (default: on CUDA) a worker thread decodes block k, on a CUDA stream of its own, while the loop
runs the DiT of block k+1; otherwise each decode runs at once in the loop's thread. What crosses from the loop's
stream to the decode stream is ordered and kept safe from the caching allocator: each decode waits for the loop's
stream; the latents stay referenced until their decode's frames are on the host; the decoder's cache as the run
starts (warmed up, or restored from an earlier run's warm-up on the same portrait) is `record_stream`ed onto the
decode stream. Either way the same calls run in the same order, so the frames are the same; each decode reports the seconds the loop was blocked on it (the
rest was hidden behind the DiT). On a CPU both would share the same cores, so the overlap is off there.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from avatars.liveavatar.streaming.chunks import DecodedFrames
from avatars.liveavatar.streaming.decoding import DecoderStage
from avatars.liveavatar.streaming.messages import BlockWork, StageReport

__all__ = ["LocalDownstream"]


class LocalDownstream:
    """Decodes the blocks the loop hands on, in order, and gives their frames back.

    `depth`: blocks whose chunk may still be pending after the loop ends a block (1 with the overlap: block k
    decodes while block k+1 denoises; 0 for live speech, where the next block may wait for the speaker, so each
    chunk goes out before it). `in_flight_at_block_end` is 0: the previous block's chunk is out before this one
    ends, so a recalibration asked for on seeing it starts at this block's end, with or without the overlap.
    """

    in_flight_at_block_end = 0

    def __init__(self, decoder: DecoderStage, overlap: bool | None, live: bool) -> None:
        self._decoder = decoder
        device = decoder.device
        overlap = device.type == "cuda" if overlap is None else overlap
        self.depth = 1 if overlap and not live else 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vae-decode") if overlap else None
        self._stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
        if self._stream is not None:
            # The decoder's cache (its warm-up, or a state restored from another run) was made on this thread's
            # stream; the decode stream reads and frees it. Its first decode waits for that work (`hand_on`), and
            # the allocator must not give its memory back to the DiT's stream while the decode stream reads it.
            decoder.record_stream(self._stream)
        self._device = device
        self._pending: deque[_Decode] = deque()

    def hand_on(self, work: BlockWork) -> None:
        started = time.perf_counter()
        if self._pool is None:
            future: Future = Future()
            future.set_result(self._decode(work.latents))
        else:
            if self._stream is not None:  # the DiT's work on the latents comes first
                self._stream.wait_stream(torch.cuda.current_stream(self._device))
            future = self._pool.submit(self._decode, work.latents)
        # the latents stay referenced until the decode is done, so their memory is not reused while read
        self._pending.append(_Decode(future, work.latents, time.perf_counter() - started))

    def ready(self) -> bool:
        """Whether the oldest block's frames are done (a hand-out now would not wait)."""
        return bool(self._pending) and self._pending[0].future.done()

    def collect(self) -> tuple[DecodedFrames, list[StageReport]]:
        """The oldest block's frames (waiting for its decode); no other stage reports on it."""
        return self._pending.popleft().result(), []

    def finish(self, blocks: int) -> None:
        """The run ends after `blocks` blocks: wait for the decodes not collected (they use the decoder's cache)
        and drop their frames."""
        while self._pending:
            self._pending.popleft().future.result()

    def close(self) -> None:
        """Wait for a decode in flight (it uses the decoder's cache) and stop the worker thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _decode(self, latents: torch.Tensor) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            frames, _ = self._decoder.decode(latents)
            frames = frames.cpu().numpy()  # the copy to the host waits for the decode's kernels
        return frames, time.perf_counter() - started


@dataclass
class _Decode:
    future: Future
    latents: torch.Tensor
    blocked_seconds: float

    def result(self) -> DecodedFrames:
        """The frames, waiting for the decode if needed; of its seconds, those not spent blocking the loop."""
        started = time.perf_counter()
        frames, seconds = self.future.result()
        blocked = self.blocked_seconds + time.perf_counter() - started
        return DecodedFrames(frames, seconds, max(0.0, seconds - blocked))
