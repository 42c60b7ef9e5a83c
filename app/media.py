"""Playable media for one run: the run's temp folder, stream segments of at least ~1 s, the whole-run mp4.

Gradio streams `gr.Video(streaming=True)` output as HLS and plays it smoothly only when segments are
consistent in length and about a second or longer, while LiveAvatar yields 0.48 s blocks (the first is
0.36 s). `SegmentBuffer` groups consecutive chunks; `write_segment` turns a group into a self-contained
H.264/AAC mp4 whose audio lasts exactly as long as its frames.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

import numpy as np

from app.encoders import Mp4Writer, open_mp4_writer, pad_to_even

RUN_DIR_PREFIX = "ispa-run-"
FINAL_GOP_SECONDS = 2.0


class MediaPiece(Protocol):
    """Anything with frames and the audio that plays with them (an `AvatarChunk` or a `Segment`)."""

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    audio: np.ndarray  # mono float32
    sample_rate: int
    fps: float


@dataclass(frozen=True)
class FfmpegStatus:
    ffmpeg: bool
    ffprobe: bool
    message: str

    @property
    def can_stream(self) -> bool:
        return self.ffmpeg and self.ffprobe


def ffmpeg_status() -> FfmpegStatus:
    """Say whether Gradio can stream video here: it runs both `ffmpeg` and `ffprobe` from PATH on every segment."""
    found = {name: shutil.which(name) is not None for name in ("ffmpeg", "ffprobe")}
    missing = [name for name, ok in found.items() if not ok]
    if not missing:
        message = "ffmpeg and ffprobe are installed: video can stream while it is generated."
    else:
        names = " and ".join(missing)
        verb = "is" if len(missing) == 1 else "are"
        message = (
            f"Streaming video needs ffmpeg and ffprobe on PATH, but {names} {verb} missing "
            "(install the 'ffmpeg' system package; the ffmpeg bundled with imageio-ffmpeg has no ffprobe). "
            "Without them only the finished video can be shown."
        )
    return FfmpegStatus(ffmpeg=found["ffmpeg"], ffprobe=found["ffprobe"], message=message)


def temp_root() -> Path:
    """Where run folders go: Gradio serves returned files from its temp dir or the system temp dir."""
    root = Path(os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return root


class RunDir:
    """A fresh folder per run holding its segments, final video and speech; removed by `cleanup`."""

    def __init__(self, root: Path | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=root or temp_root()))

    def new_path(self, suffix: str) -> Path:
        """A unique file name in the run folder (never derived from user input)."""
        if not re.fullmatch(r"\.[a-z0-9]{1,8}", suffix):
            raise ValueError(f"suffix must look like '.mp4', got {suffix!r}")
        return self.path / f"{uuid.uuid4().hex}{suffix}"

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


def remove_stale_run_dirs(max_age_seconds: float, root: Path | None = None) -> int:
    """Delete run folders older than `max_age_seconds` (left by crashed or abandoned runs); returns how many."""
    cutoff = time.time() - max_age_seconds
    removed = 0
    for entry in (root or temp_root()).glob(f"{RUN_DIR_PREFIX}*"):
        if entry.is_dir() and not entry.is_symlink() and entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


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


@dataclass(frozen=True)
class Segment:
    """Consecutive chunks joined into one stream segment."""

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    audio: np.ndarray  # mono float32, T / fps seconds
    sample_rate: int
    fps: float
    chunk_indices: tuple[int, ...]

    @property
    def seconds(self) -> float:
        return len(self.frames) / self.fps


class ChunkLike(MediaPiece, Protocol):
    index: int


class SegmentBuffer:
    """Groups consecutive chunks into segments of at least `min_seconds`, so segment lengths stay alike."""

    def __init__(self, min_seconds: float = 1.0) -> None:
        if not (math.isfinite(min_seconds) and min_seconds > 0):
            raise ValueError(f"min_seconds must be a positive number, got {min_seconds}")
        self.min_seconds = min_seconds
        self._pending: list[ChunkLike] = []

    def push(self, chunk: ChunkLike) -> Segment | None:
        """Add a chunk; returns a segment once the pending chunks reach `min_seconds`."""
        check_piece(chunk, max_audio_error_samples=1.0)
        if self._pending:
            first = self._pending[0]
            if (chunk.fps, chunk.sample_rate, chunk.frames.shape[1:]) != (
                first.fps,
                first.sample_rate,
                first.frames.shape[1:],
            ):
                raise ValueError("all chunks of a run must share fps, sample rate and frame size")
        self._pending.append(chunk)
        pending_frames = sum(len(c.frames) for c in self._pending)
        # The small tolerance keeps e.g. 25 frames at 25 fps from missing a 1.0 s target to rounding.
        if pending_frames / chunk.fps >= self.min_seconds - 1e-9:
            return self.flush()
        return None

    def flush(self) -> Segment | None:
        """Return what is pending (possibly shorter than `min_seconds`) as a segment; call at the end of a run."""
        if not self._pending:
            return None
        chunks, self._pending = self._pending, []
        return Segment(
            frames=np.concatenate([c.frames for c in chunks]),
            audio=np.concatenate([np.asarray(c.audio, dtype=np.float32) for c in chunks]),
            sample_rate=chunks[0].sample_rate,
            fps=chunks[0].fps,
            chunk_indices=tuple(c.index for c in chunks),
        )


def write_segment(piece: MediaPiece, run_dir: RunDir) -> Path:
    """Write one stream segment: its GOP spans the whole piece, so the first frame is its only keyframe."""
    # Grouped chunks may each carry up to half a sample of rounding; a gross mismatch is a backend bug.
    check_piece(piece, max_audio_error_samples=piece.sample_rate / piece.fps / 2)
    frames = pad_to_even(piece.frames)
    _, height, width, _ = frames.shape
    path = run_dir.new_path(".mp4")
    with open_mp4_writer(
        path, width=width, height=height, fps=piece.fps, sample_rate=piece.sample_rate, gop_frames=len(frames)
    ) as writer:
        writer.write(frames, piece.audio)
    return path


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
