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

from avatars.media.mp4 import open_mp4_writer, pad_to_even
from avatars.media.run_video import MediaPiece, check_piece

RUN_DIR_PREFIX = "ispa-run-"


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
    """Where run folders go: Gradio's own upload and cache folder (GRADIO_TEMP_DIR, else `gradio` in the system
    temp dir), so returned files are served without a copy and one folder holds everything the disk budget of
    `app.upload_budget` counts."""
    root = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
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
