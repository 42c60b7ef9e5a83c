"""H.264 + AAC mp4 writers that take frames and audio piece by piece.

The encoder is chosen once per process: PyAV with a software H.264 encoder it ships (libx264 in the
official wheels), or, where PyAV has none, the ffmpeg program that imageio-ffmpeg bundles.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Literal

import av
import numpy as np
import soundfile as sf

logger = logging.getLogger(__name__)

# Software encoders only: PyAV also lists hardware ones (nvenc, qsv, ...) where no such device exists.
PYAV_H264_ENCODERS = ("libx264", "libopenh264")
AUDIO_BITRATE = 128_000
_FFMPEG_TIMEOUT_S = 600


class MediaError(RuntimeError):
    """Encoding failed, or no H.264 encoder is available on this machine."""


@dataclass(frozen=True)
class H264Encoder:
    kind: Literal["pyav", "ffmpeg"]
    name: str  # the encoder's name in PyAV / ffmpeg, e.g. "libx264"
    executable: str | None = None  # the ffmpeg program, when kind == "ffmpeg"


def _pyav_has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # PyAV raises UnknownCodecError or ValueError depending on the name
        return False
    return True


@lru_cache(maxsize=1)
def choose_h264_encoder() -> H264Encoder:
    """Pick the H.264 encoder to use; raises `MediaError` when there is none."""
    for name in PYAV_H264_ENCODERS:
        if _pyav_has_encoder(name):
            return H264Encoder("pyav", name)
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        raise MediaError("No H.264 encoder: PyAV has none and no ffmpeg program was found") from exc
    logger.warning("PyAV has no software H.264 encoder; encoding with the ffmpeg program instead")
    return H264Encoder("ffmpeg", "libx264", exe)


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: repeat the last row/column rather than crop a pixel away."""
    _, height, width, _ = frames.shape
    pad_h, pad_w = height % 2, width % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _video_options(encoder_name: str, gop_frames: int) -> dict[str, str]:
    # A keyframe every gop_frames frames and none in between: a segment written with gop_frames equal to its
    # length has exactly one, its first frame. x264's ultrafast preset already turns scene-cut keyframes
    # off, and zerolatency turns B-frames and look-ahead off, so packets leave the encoder at once.
    options = {"g": str(gop_frames)}
    if encoder_name == "libx264":
        options |= {"preset": "ultrafast", "tune": "zerolatency"}
    return options


class Mp4Writer(ABC):
    """Base of the two writers: shape checks and the context-manager protocol (discard on error)."""

    def __init__(self, path: Path, width: int, height: int, fps: float, sample_rate: int) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs even dimensions, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height, self.fps, self.sample_rate = width, height, fps, sample_rate

    def write(self, frames: np.ndarray, audio: np.ndarray) -> None:
        """Append frames [T, H, W, 3] uint8 RGB and mono float32 audio."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"frames must be uint8 [T, {self.height}, {self.width}, 3], got {frames.dtype} {frames.shape}"
            )
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono (1-D), got shape {audio.shape}")
        self._write(np.ascontiguousarray(frames), np.ascontiguousarray(audio, dtype=np.float32))

    @abstractmethod
    def close(self) -> Path:
        """Flush the encoders and finish the file; returns its path."""

    @abstractmethod
    def discard(self) -> None:
        """Stop without a usable file (after an error) and remove what was written."""

    @abstractmethod
    def _write(self, frames: np.ndarray, audio: np.ndarray) -> None:
        """Encode one checked, contiguous piece."""

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


class PyAVMp4Writer(Mp4Writer):
    """Encodes in-process; timestamps run on across writes so pieces join without gaps."""

    def __init__(
        self,
        path: Path,
        encoder_name: str,
        width: int,
        height: int,
        fps: float,
        sample_rate: int,
        gop_frames: int,
    ) -> None:
        super().__init__(path, width, height, fps, sample_rate)
        self._container = av.open(str(self.path), mode="w")
        try:
            self._video = self._container.add_stream(encoder_name, rate=Fraction(fps).limit_denominator(1001))
            self._video.width, self._video.height = width, height
            self._video.pix_fmt = "yuv420p"
            self._video.options = _video_options(encoder_name, gop_frames)
            self._audio = self._container.add_stream("aac", rate=sample_rate)
            self._audio.layout = "mono"
            self._audio.bit_rate = AUDIO_BITRATE
        except Exception:
            self.discard()
            raise
        self._frames_written = 0
        self._samples_written = 0

    def _write(self, frames: np.ndarray, audio: np.ndarray) -> None:
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = self._frames_written
            self._frames_written += 1
            self._container.mux(self._video.encode(video_frame))
        if audio.size:
            audio_frame = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
            audio_frame.sample_rate = self.sample_rate
            audio_frame.pts = self._samples_written
            self._samples_written += audio.size
            self._container.mux(self._audio.encode(audio_frame))

    def close(self) -> Path:
        self._container.mux(self._video.encode())
        self._container.mux(self._audio.encode())
        self._container.close()
        return self.path

    def discard(self) -> None:
        self._container.close()
        self.path.unlink(missing_ok=True)


class FfmpegMp4Writer(Mp4Writer):
    """Fallback through the ffmpeg program: video is piped to one process, audio goes to a wav beside it,
    and `close` muxes the two (copying the video, encoding the audio to AAC)."""

    def __init__(
        self,
        path: Path,
        encoder: H264Encoder,
        width: int,
        height: int,
        fps: float,
        sample_rate: int,
        gop_frames: int,
    ) -> None:
        super().__init__(path, width, height, fps, sample_rate)
        self._exe = str(encoder.executable)
        stem = f".{self.path.stem}-{uuid.uuid4().hex[:8]}"
        self._video_tmp = self.path.with_name(f"{stem}.video.mp4")
        self._audio_tmp = self.path.with_name(f"{stem}.audio.wav")
        video_options = [
            x for key, value in _video_options(encoder.name, gop_frames).items() for x in (f"-{key}", value)
        ]
        cmd = [
            self._exe, "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
            "-framerate", str(Fraction(fps).limit_denominator(1001)), "-i", "pipe:0",
            "-c:v", encoder.name, "-pix_fmt", "yuv420p", *video_options, str(self._video_tmp),
        ]  # fmt: skip
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the ffmpeg process
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=self._stderr)
        self._wav = sf.SoundFile(self._audio_tmp, "w", samplerate=sample_rate, channels=1, subtype="FLOAT")

    def _write(self, frames: np.ndarray, audio: np.ndarray) -> None:
        try:
            self._proc.stdin.write(frames.tobytes())
        except BrokenPipeError as exc:
            raise MediaError(f"ffmpeg stopped while encoding: {self._error_text()}") from exc
        self._wav.write(audio)

    def close(self) -> Path:
        try:
            self._finish_video()
            self._run(
                "-i", str(self._video_tmp), "-i", str(self._audio_tmp), "-map", "0:v", "-map", "1:a",
                "-c:v", "copy", "-c:a", "aac", "-b:a", str(AUDIO_BITRATE), str(self.path),
            )  # fmt: skip
        finally:
            self._stderr.close()
            self._remove_temporaries()
        return self.path

    def discard(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._wav.close()
        self._stderr.close()
        self._remove_temporaries()
        self.path.unlink(missing_ok=True)

    def _finish_video(self) -> None:
        self._wav.close()
        self._proc.stdin.close()
        code = self._proc.wait(timeout=_FFMPEG_TIMEOUT_S)
        if code != 0:
            raise MediaError(f"ffmpeg failed to encode video (exit {code}): {self._error_text()}")

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [self._exe, "-hide_banner", "-loglevel", "error", "-y", *args],
            capture_output=True,
            timeout=_FFMPEG_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise MediaError(
                f"ffmpeg failed to mux (exit {done.returncode}): {done.stderr.decode(errors='replace')}"
            )

    def _error_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def _remove_temporaries(self) -> None:
        self._video_tmp.unlink(missing_ok=True)
        self._audio_tmp.unlink(missing_ok=True)


def open_mp4_writer(
    path: Path, *, width: int, height: int, fps: float, sample_rate: int, gop_frames: int
) -> Mp4Writer:
    """An mp4 writer with the best available H.264 encoder; `gop_frames` is the keyframe interval."""
    if gop_frames < 1:
        raise ValueError(f"gop_frames must be at least 1, got {gop_frames}")
    encoder = choose_h264_encoder()
    if encoder.kind == "pyav":
        return PyAVMp4Writer(path, encoder.name, width, height, fps, sample_rate, gop_frames)
    return FfmpegMp4Writer(path, encoder, width, height, fps, sample_rate, gop_frames)
