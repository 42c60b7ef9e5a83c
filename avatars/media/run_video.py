"""The whole run as one mp4 (H.264 + AAC), written chunk by chunk so long runs never hold all frames."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from avatars.media.mp4 import Mp4Writer, open_mp4_writer, pad_to_even

FINAL_GOP_SECONDS = 2.0


class MediaPiece(Protocol):
    """Anything with frames and the audio that plays with them (an `AvatarChunk` or a `Segment`)."""

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    audio: np.ndarray  # mono float32
    sample_rate: int
    fps: float


def check_piece(piece: MediaPiece, max_audio_error_samples: float) -> None:
    """Reject pieces whose audio does not last as long as their frames: HLS would drift or hold the picture."""
    frames, audio = piece.frames, piece.audio
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be non-empty uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (1-D), got shape {audio.shape}")
    if piece.fps <= 0 or piece.sample_rate <= 0:
        raise ValueError(f"fps and sample_rate must be positive, got {piece.fps} and {piece.sample_rate}")
    expected = len(frames) / piece.fps * piece.sample_rate
    if abs(len(audio) - expected) > max_audio_error_samples:
        raise ValueError(
            f"{len(frames)} frames at {piece.fps} fps need {expected:.1f} audio samples at "
            f"{piece.sample_rate} Hz, got {len(audio)}"
        )


class RunVideoWriter:
    """The whole run as one mp4, written piece by piece so a long run never holds all its frames."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._writer: Mp4Writer | None = None
        self._format: tuple[float, int, tuple[int, ...]] | None = None
        self._closed = False

    def add(self, piece: MediaPiece) -> None:
        """Encode and write one chunk or segment; the first one fixes the video's size, fps and sample rate."""
        if self._closed:
            raise ValueError("this run video is already closed")
        check_piece(piece, max_audio_error_samples=piece.sample_rate / piece.fps / 2)
        frames = pad_to_even(piece.frames)
        piece_format = (piece.fps, piece.sample_rate, frames.shape[1:])
        if self._writer is None:
            _, height, width, _ = frames.shape
            self._writer = open_mp4_writer(
                self.path,
                width=width,
                height=height,
                fps=piece.fps,
                sample_rate=piece.sample_rate,
                gop_frames=max(1, round(FINAL_GOP_SECONDS * piece.fps)),
            )
            self._format = piece_format
        elif piece_format != self._format:
            raise ValueError("all pieces of a run video must share fps, sample rate and frame size")
        try:
            self._writer.write(frames, np.asarray(piece.audio, dtype=np.float32))
        except Exception:
            self.discard()
            raise

    def close(self) -> Path | None:
        """Finish the file; returns its path, or None when nothing was added."""
        self._closed = True
        if self._writer is None:
            return None
        writer, self._writer = self._writer, None
        return writer.close()

    def discard(self) -> None:
        """Abandon the run video (e.g. the run was cancelled) and delete the partial file."""
        self._closed = True
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.discard()
