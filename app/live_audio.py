"""Live microphone audio: pieces pushed by Gradio's `.stream()` event, read by the run(s) as they arrive.

Gradio runs the microphone's `.stream()` event and the generation event side by side, so the audio has to
cross from one handler to the other on the server. `LiveAudioFeed` is that crossing: the stream handler
pushes each piece, and each run reads them through its own cursor (compare mode runs two generators on the
same speech), resampled to the rate that run wants. It also logs when each piece arrived, so the app can
measure how long speech takes to come back as video.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import soxr

from app.validation import MAX_AUDIO_SECONDS, ValidationError
from avatars.media.audio import AudioReadError, pcm_to_float32, read_audio_file


def decode_mic_piece(value: str | Path | tuple[int, np.ndarray]) -> tuple[int, np.ndarray]:
    """One streamed microphone piece (a small WAV file from the browser, or Gradio's `(rate, samples)`), as mono
    float32 within full scale."""
    try:
        if isinstance(value, tuple):
            rate, samples = value
            mono = pcm_to_float32(samples)
        else:
            mono, rate, _ = read_audio_file(value)
    except AudioReadError:
        raise ValidationError("A piece of microphone audio could not be decoded.") from None
    if not (isinstance(rate, int | np.integer) and rate > 0):
        raise ValidationError("The microphone audio has an invalid sample rate.")
    return int(rate), np.clip(mono, -1.0, 1.0)


class LiveAudioFeed:
    """Microphone audio arriving over time; any number of readers, each with its own position and rate."""

    def __init__(self, max_seconds: float = MAX_AUDIO_SECONDS, clock: Callable[[], float] = time.monotonic):
        if not (math.isfinite(max_seconds) and max_seconds > 0):
            raise ValueError(f"max_seconds must be a positive number, got {max_seconds}")
        self.max_seconds = max_seconds
        self._clock = clock
        self._cond = threading.Condition()
        self._pieces: list[np.ndarray] = []
        self._rate: int | None = None
        self._samples = 0
        self._arrival_ends: list[float] = []  # seconds of audio received after each piece, increasing
        self._arrival_times: list[float] = []  # clock() when that piece arrived
        self._closed_at: float | None = None
        self.truncated = False

    @property
    def closed(self) -> bool:
        return self._closed_at is not None

    @property
    def seconds(self) -> float:
        """Audio received so far."""
        with self._cond:
            return self._samples / self._rate if self._rate else 0.0

    def push(self, rate: int, samples: np.ndarray) -> None:
        """Add a mono float32 piece; the first piece fixes the rate. Audio past `max_seconds` is dropped and
        the feed closes, since the run could not use it anyway."""
        if samples.ndim != 1 or samples.dtype != np.float32:
            raise ValueError(f"pieces must be mono float32, got {samples.dtype} {samples.shape}")
        with self._cond:
            if self.closed or len(samples) == 0:
                return
            if self._rate is None:
                self._rate = rate
            elif rate != self._rate:
                raise ValidationError("The microphone's sample rate changed during the recording.")
            room = math.floor(self.max_seconds * rate) - self._samples
            if len(samples) >= room:
                samples, self.truncated = samples[: max(room, 0)], True
            if len(samples):
                self._pieces.append(samples)
                self._samples += len(samples)
                self._arrival_ends.append(self._samples / rate)
                self._arrival_times.append(self._clock())
            if self.truncated:
                self._close_locked()
            self._cond.notify_all()

    def close(self) -> None:
        """No more audio will come (recording stopped, run stopped, or session ended); readers finish."""
        with self._cond:
            self._close_locked()
            self._cond.notify_all()

    def _close_locked(self) -> None:
        if self._closed_at is None:
            self._closed_at = self._clock()

    def pieces(self, target_rate: int) -> Iterator[np.ndarray]:
        """The audio as it arrives, resampled to `target_rate`; blocks while waiting, ends after `close`."""
        if target_rate <= 0:
            raise ValueError(f"target_rate must be positive, got {target_rate}")
        position = 0
        resampler: soxr.ResampleStream | None = None
        while True:
            with self._cond:
                while position >= len(self._pieces) and not self.closed:
                    self._cond.wait()
                batch = self._pieces[position:]
                position = len(self._pieces)
                finished = self.closed  # closed and everything before the close is in `batch`
                rate = self._rate
            if rate is not None and rate != target_rate and resampler is None:
                resampler = soxr.ResampleStream(rate, target_rate, 1, dtype="float32", quality="HQ")
            for piece in batch:
                out = piece if resampler is None else resampler.resample_chunk(piece)
                if len(out):
                    yield out
            if finished:
                if resampler is not None:
                    tail = resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
                    if len(tail):
                        yield tail
                return

    def arrival_time(self, seconds: float) -> float | None:
        """When the audio up to `seconds` had arrived (clock time); None if it has not arrived yet. Past the
        end of a closed feed (the run pads its last block), the close time."""
        with self._cond:
            # The 1e-6 s tolerance absorbs float rounding of seconds computed from frame counts.
            i = bisect.bisect_left(self._arrival_ends, seconds - 1e-6)
            if i < len(self._arrival_times):
                return self._arrival_times[i]
            return self._closed_at
