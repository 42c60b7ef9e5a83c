"""A run's speech as it arrives: wav2vec2 features in blocks of 12 video frames, and raw slices per chunk."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from avatars.liveavatar.block_layout import VIDEO_FRAMES_PER_BLOCK
from avatars.liveavatar.encoders.audio import AudioEncoder
from avatars.liveavatar.encoders.audio_stream import StreamingAudioEncoder
from avatars.media.audio import pcm_to_float32

__all__ = ["LONG_CLIP_WINDOWS", "ONE_PASS_MAX_SECONDS", "AudioTimeline"]

# Audio known in full gets the official one wav2vec2 pass up to this length: at 30 s the pass holds 25 hidden states
# of 1,500 steps (77 MB in bf16 for wav2vec2-large) and 1,500² attention scores per head, an estimate. Longer
# clips go through overlapping windows (`StreamingAudioEncoder`, the whole clip being known: a wide lookahead), so
# the audio path's memory stays flat however long the speech is.
ONE_PASS_MAX_SECONDS = 30.0
# Windows of 20 blocks (9.6 s) seeing 4 s before and 2 s after: about 1.6× the one pass's compute.
LONG_CLIP_WINDOWS = {"group_frames": 20 * VIDEO_FRAMES_PER_BLOCK, "left_context_s": 4.0, "lookahead_s": 2.0}
_LONG_CLIP_PIECE_SECONDS = 1.0  # how much of a long clip is fed to the windowed encoder at a time


class AudioTimeline:
    """The request's audio as it arrives: wav2vec2 features in blocks of 12 frames, and raw slices per chunk.

    Whole audio (an array) up to `ONE_PASS_MAX_SECONDS` gets the official features: one wav2vec2 pass over the clip
    (`AudioEncoder.frame_features`, bit-equal to the official computation); a longer one goes through overlapping
    windows (`LONG_CLIP_WINDOWS`), block by block, as it is consumed. Live audio (an iterable of pieces)
    goes through the streaming encoder at its default settings, chosen by `bench/live_audio_fidelity.py` to
    stay closest to the whole-clip features; that path keeps its buffers bounded. Raw samples are kept only
    until their chunk is handed out.
    """

    def __init__(
        self, audio: np.ndarray | Iterable[np.ndarray], sample_rate: int, encoder: AudioEncoder
    ) -> None:
        self.sample_rate = sample_rate
        self._whole_clip_encoder = encoder
        self._whole: np.ndarray | None = None
        if isinstance(audio, np.ndarray):
            self._whole = pcm_to_float32(audio)
            if self._whole.size == 0:
                raise ValueError("audio is empty (zero samples)")
        else:
            self._pieces = audio
            self._encoder = StreamingAudioEncoder(encoder, sample_rate, group_frames=VIDEO_FRAMES_PER_BLOCK)
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # sample index of _buffer[0]
        self._features = None  # features not yet handed out, [n, layers, dim]

    def feature_blocks(self) -> Iterator[tuple[torch.Tensor, int]]:
        """(features [12, layers, dim], frames with real audio) per block, as soon as each is computable."""
        if self._whole is not None:
            self._buffer = self._whole
            if self._whole.size <= ONE_PASS_MAX_SECONDS * self.sample_rate:
                features = self._whole_clip_encoder.frame_features(self._whole, self.sample_rate)
                yield from self._take(features, final=True)
                return
            yield from self._long_clip_blocks()
            return
        for piece in self._pieces:
            if piece is None:
                break
            samples = pcm_to_float32(piece)
            self._buffer = np.concatenate([self._buffer, samples])
            yield from self._take(self._encoder.push(samples), final=False)
        if self._encoder.frames_done == 0 and self._received() == 0:
            raise ValueError("audio is empty (zero samples)")
        yield from self._take(self._encoder.finish(), final=True)

    def _long_clip_blocks(self) -> Iterator[tuple[torch.Tensor, int]]:
        """A long clip known in full, in overlapping windows fed a piece at a time: nothing grows with its length."""
        encoder = StreamingAudioEncoder(
            self._whole_clip_encoder,
            self.sample_rate,
            **LONG_CLIP_WINDOWS,
        )
        piece = max(1, round(_LONG_CLIP_PIECE_SECONDS * self.sample_rate))
        for start in range(0, self._whole.size, piece):
            yield from self._take(encoder.push(self._whole[start : start + piece]), final=False)
        yield from self._take(encoder.finish(), final=True)

    def _take(self, new: torch.Tensor, final: bool) -> Iterator[tuple[torch.Tensor, int]]:
        pending = new if self._features is None else torch.cat([self._features, new])
        while len(pending) >= VIDEO_FRAMES_PER_BLOCK:
            yield pending[:VIDEO_FRAMES_PER_BLOCK], VIDEO_FRAMES_PER_BLOCK
            pending = pending[VIDEO_FRAMES_PER_BLOCK:]
        if final and len(pending):
            # The official code zero-fills the features past the end of the audio; those frames are cut.
            padding = pending.new_zeros(VIDEO_FRAMES_PER_BLOCK - len(pending), *pending.shape[1:])
            yield torch.cat([pending, padding]), len(pending)
            pending = pending[:0]
        self._features = pending

    @property
    def live(self) -> bool:
        """True when the audio arrives piece by piece (the next block may wait for it)."""
        return self._whole is None

    def _received(self) -> int:
        return self._buffer_start + self._buffer.size

    def samples_for_frames(self, first_frame: int, last_frame: int, fps: int) -> np.ndarray:
        """The audio that plays with video frames [first_frame, last_frame), zero-padded past the end."""
        start = round(first_frame * self.sample_rate / fps)
        stop = round(last_frame * self.sample_rate / fps)
        begin = start - self._buffer_start
        out = self._buffer[max(0, begin) : stop - self._buffer_start]
        if begin < 0:  # never: chunks are handed out in order
            raise RuntimeError("audio for an earlier chunk was already released")
        if out.size < stop - start:
            out = np.concatenate([out, np.zeros(stop - start - out.size, dtype=np.float32)])
        self._buffer = self._buffer[max(0, stop - self._buffer_start) :]
        self._buffer_start = max(self._buffer_start, stop)
        return out
