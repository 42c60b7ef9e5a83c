"""Per-frame wav2vec2 features for audio that arrives in pieces (a live microphone), and only for that.

Audio known in full gets the official whole-clip features (`AudioEncoder.frame_features`). wav2vec2 attends over
its whole input and the official 50 → 30 Hz interpolation stretches with the clip's length, so features of a clip
that is still growing cannot equal those. This encoder fixes its own definition instead, one that does not depend
on how the audio is cut into pieces:

* Frames are produced in groups of `group_frames` (12 = one DiT block). The features of group [k0, k1) come from
  one wav2vec2 pass over the window that starts `left_context_s` before frame k0 (aligned to wav2vec2's 320-sample
  grid, so window steps are global steps) and ends `lookahead_s` after frame k1 − 1; the window is normalised
  on its own, as the official extractor normalises a clip.
* Video frame k reads the 50 Hz hidden states at the nominal time of its official 30 Hz step plus a fixed
  offset: position `round(1.2 k) · 5/3 + read_offset_steps`, linearly interpolated.
* A group is produced as soon as its window has arrived; `finish()` produces the rest with the windows cut at the
  end of the audio. The total frame count equals the whole-clip count (`num_video_frames`).

Equivalences (tested): pieces of any sizes give identical features; with `left_context_s` and `lookahead_s` at
least the clip's duration, every window is the whole clip, so the features are the whole-clip hidden states read
at these positions. Against the official whole-clip features two things differ: (1) the official positions
`j · (T−1)/(L−1)` run ahead of the nominal `j · 5/3` by a drift that grows linearly from 0 at the clip's start to
between 2/3 and 7/3 steps at its end (set by the step count mod 5), unknowable while the clip grows; (2) context
beyond the window is not seen. The defaults minimise the measured distance to the whole-clip features
(`bench/live_audio_fidelity.py`, random-weight wav2vec2, clips of 5–20 s): an offset of half a step (best of
0, ¼, ½, ¾, 1) lowers the mean rel. Frobenius from 0.48 to 0.36 over the five drift cases; 2 s of left context
is as close as 8 s (≤ 0.001 apart; 4 s kept, since the real model's attention may reach further); a lookahead of
1 s instead of 0.2 s gained only 0.025 for 0.8 s more latency. Latency: a group waits for `lookahead_s` of audio after its last
frame. The size of both parts with the real wav2vec2 weights is not measured (no weights offline).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from avatars.liveavatar.encoders.audio import (
    INTERMEDIATE_RATE,
    SAMPLE_RATE,
    WAV2VEC_RATE,
    AudioEncoder,
    frame_steps_30hz,
    num_video_frames,
)
from avatars.media.audio import pcm_to_float32


def _positions(frames: torch.Tensor, offset_steps: float = 0.0) -> torch.Tensor:
    """50 Hz read positions (float64) of video frames: their official 30 Hz step times 50/30, plus an offset."""
    return frame_steps_30hz(frames).double() * (WAV2VEC_RATE / INTERMEDIATE_RATE) + offset_steps


class StreamingAudioEncoder:
    """Feed `push(piece)` as audio arrives; each call returns the frames that became ready, [n, layers, dim]."""

    def __init__(
        self,
        encoder: AudioEncoder,
        sample_rate: int,
        *,
        group_frames: int = 12,
        left_context_s: float = 4.0,
        lookahead_s: float = 0.2,
        read_offset_steps: float = 0.5,
    ) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if group_frames <= 0:
            raise ValueError(f"group_frames must be positive, got {group_frames}")
        if left_context_s < 0:
            raise ValueError(f"left_context_s must be ≥ 0, got {left_context_s}")
        if lookahead_s < 1 / WAV2VEC_RATE:
            # With less than one step of lookahead a group could claim a frame the finished clip does not have.
            raise ValueError(f"lookahead_s must be at least {1 / WAV2VEC_RATE} s, got {lookahead_s}")
        if not 0.0 <= read_offset_steps <= 1.0:
            raise ValueError(f"read_offset_steps must be in [0, 1], got {read_offset_steps}")
        self.encoder = encoder
        self.group_frames = group_frames
        self._left_steps = round(left_context_s * WAV2VEC_RATE)
        self._lookahead_steps = round(lookahead_s * WAV2VEC_RATE)
        self._offset = read_offset_steps
        self.settings = {
            "left_context_s": left_context_s,
            "lookahead_s": lookahead_s,
            "read_offset_steps": read_offset_steps,
        }
        self._resampler = None
        if sample_rate != SAMPLE_RATE:
            import soxr  # only to resample: 16 kHz audio (the benchmark's) streams without it

            self._resampler = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # global 16 kHz sample index of _buffer[0]
        self._received = 0  # 16 kHz samples received so far
        self.frames_done = 0
        self.finished = False

    def push(self, piece: np.ndarray) -> torch.Tensor:
        """Add a piece of audio (1-D or (samples, channels), at the constructor's sample rate)."""
        if self.finished:
            raise ValueError("push() after finish(): start a new StreamingAudioEncoder for new audio")
        samples = pcm_to_float32(piece)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=False)
        self._append(samples)
        return self._emit(final=False)

    def finish(self) -> torch.Tensor:
        """The audio has ended: return the remaining frames (windows cut at the end of the audio)."""
        if self.finished:
            raise ValueError("finish() was already called")
        if self._resampler is not None:
            self._append(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        self.finished = True
        if self._received < self.encoder.min_samples:
            raise ValueError(
                f"audio too short: {self._received} samples at 16 kHz, at least {self.encoder.min_samples} are needed"
            )
        return self._emit(final=True)

    def _append(self, samples: np.ndarray) -> None:
        self._buffer = np.concatenate([self._buffer, samples])
        self._received += samples.size

    def _total_frames(self) -> int:
        """The whole-clip frame count, the same as the official code's for this many samples."""
        steps_50hz = self.encoder.num_steps(self._received)
        return num_video_frames(int(steps_50hz / float(WAV2VEC_RATE) * INTERMEDIATE_RATE))

    def _window(self, first: int, last: int) -> tuple[int, int]:
        """Global sample range [start, end) of the window for frames first..last (inclusive)."""
        positions = _positions(torch.tensor([first, last]), self._offset)
        start_step = max(0, math.floor(positions[0]) - self._left_steps)
        end_step = math.ceil(positions[1]) + self._lookahead_steps
        return start_step * self.encoder.hop, end_step * self.encoder.hop + self.encoder.receptive_field

    def _emit(self, final: bool) -> torch.Tensor:
        out = []
        total = self._total_frames() if final else None
        while True:
            first = self.frames_done
            last = first + self.group_frames - 1
            if final:
                if first >= total:
                    break
                last = min(last, total - 1)
            start, end = self._window(first, last)
            if not final and end > self._received:
                break
            end = min(end, self._received)
            audio = self._buffer[start - self._buffer_start : end - self._buffer_start]
            out.append(self._features(audio, start // self.encoder.hop, torch.arange(first, last + 1)))
            self.frames_done = last + 1
            self._trim()
        if not out:
            return torch.zeros(0, self.encoder.num_hidden_states, self.encoder.model.config.hidden_size)
        return torch.cat(out)

    def _features(self, audio: np.ndarray, start_step: int, frames: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder.hidden_states(audio)  # [layers, T_window, dim]
        positions = _positions(frames, self._offset) - start_step
        below = positions.floor().long().clamp(max=hidden.shape[1] - 1)
        above = (below + 1).clamp(max=hidden.shape[1] - 1)
        weight = (positions - below.double()).clamp(0.0, 1.0).float()[None, :, None]
        mixed = hidden[:, below] * (1.0 - weight) + hidden[:, above] * weight
        return self.encoder.round_features(mixed.permute(1, 0, 2).contiguous())

    def _trim(self) -> None:
        """Drop samples no later window can need."""
        keep_from = self._window(self.frames_done, self.frames_done)[0]
        if keep_from > self._buffer_start:
            self._buffer = self._buffer[keep_from - self._buffer_start :]
            self._buffer_start = keep_from
