"""Driving-audio check: decode any common format, refuse empty, silent or too-long audio, and return mono
float32 at the backend's sample rate."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import soxr

from app.validation.errors import ValidationError

MAX_AUDIO_SECONDS = 60.0
SILENCE_RMS = 1e-3  # -60 dBFS: quieter than any usable speech recording
AUDIO_CONTAINERS = ("mp3", "mov,mp4,m4a,3gp,3g2,mj2", "ogg", "matroska,webm", "flac", "wav", "aac")


@dataclass
class AudioCheck:
    samples: np.ndarray  # mono float32 at sample_rate
    sample_rate: int
    original_sample_rate: int
    original_channels: int
    warnings: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def validate_audio(
    source: str | Path | tuple[int, np.ndarray] | None,
    *,
    target_rate: int,
    max_seconds: float = MAX_AUDIO_SECONDS,
    silence_rms: float = SILENCE_RMS,
) -> AudioCheck:
    """Decode driving audio (a file, or Gradio's `(rate, samples)`), check it, and return mono at `target_rate`."""
    if target_rate <= 0:
        raise ValueError(f"target_rate must be positive, got {target_rate}")
    if source is None:
        raise ValidationError("Please provide the driving audio: upload or record it, or type text to speak.")
    if isinstance(source, tuple):
        rate, data = source
        samples = _to_float(np.asarray(data))
    else:
        rate, samples = _read_audio_file(Path(source), max_seconds)
    if not (isinstance(rate, numbers.Integral) and rate > 0):
        raise ValidationError("The audio has an invalid sample rate.")
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.ndim != 2:
        raise ValidationError("The audio has an unexpected layout; please upload a mono or stereo file.")
    channels = samples.shape[1]
    if samples.shape[0] == 0 or channels == 0:
        raise ValidationError("The audio is empty.")
    seconds = samples.shape[0] / rate
    if seconds > max_seconds:
        raise ValidationError(
            f"The audio is {seconds:.1f} s long; the limit is {max_seconds:g} s. Please trim it."
        )
    if not np.isfinite(samples).all():
        raise ValidationError("The audio contains invalid sample values (NaN or infinity).")
    mono = samples.mean(axis=1, dtype=np.float64)
    rms = float(np.sqrt(np.mean(mono**2)))
    if rms < silence_rms:
        raise ValidationError(
            f"The audio is silent (its level is below {20 * math.log10(silence_rms):.0f} dBFS); "
            "it needs speech to drive the avatar."
        )
    notes = []
    if np.abs(mono).max() > 1.0:
        mono = np.clip(mono, -1.0, 1.0)
        notes.append("The audio went beyond full scale and was clipped.")
    return AudioCheck(
        samples=_resample(mono.astype(np.float32), int(rate), target_rate),
        sample_rate=target_rate,
        original_sample_rate=int(rate),
        original_channels=channels,
        warnings=notes,
    )


def _to_float(data: np.ndarray) -> np.ndarray:
    """Integer PCM (as Gradio's numpy audio delivers it) to float in [-1, 1]."""
    if data.dtype.kind == "f":
        return data.astype(np.float32)
    if data.dtype.kind == "i":
        return (data.astype(np.float64) / float(-np.iinfo(data.dtype).min)).astype(np.float32)
    if data.dtype.kind == "u":
        middle = (np.iinfo(data.dtype).max + 1) / 2
        return ((data.astype(np.float64) - middle) / middle).astype(np.float32)
    raise ValidationError("The audio samples have an unsupported type.")


_UNREADABLE_AUDIO = "The audio file could not be decoded. Supported: WAV, FLAC, OGG, MP3, M4A/AAC, WebM."


def _read_audio_file(path: Path, max_seconds: float) -> tuple[int, np.ndarray]:
    """WAV/FLAC/OGG through libsndfile, other containers through PyAV. The length limit is checked before
    decoding (libsndfile) or while decoding (PyAV), so an over-long upload is never decoded whole."""
    if not path.is_file():
        raise ValidationError("The audio file could not be found; please upload it again.")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return _read_with_pyav(path, max_seconds)
    if info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
        raise ValidationError(
            f"The audio is {info.frames / info.samplerate:.1f} s long; the limit is {max_seconds:g} s. "
            "Please trim it."
        )
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        raise ValidationError(_UNREADABLE_AUDIO) from None
    return rate, data


def _read_with_pyav(path: Path, max_seconds: float) -> tuple[int, np.ndarray]:
    try:
        with av.open(str(path)) as container:
            if container.format.name not in AUDIO_CONTAINERS or not container.streams.audio:
                raise ValidationError(_UNREADABLE_AUDIO)
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate
            limit = math.floor(max_seconds * rate) + 1 if rate else None
            pieces, total = [], 0
            # Decode to planar float at the source's own rate and layout; downmixing happens later.
            resampler = av.AudioResampler(format="fltp")
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray())
                    total += out.samples
                if limit is not None and total > limit:
                    raise ValidationError(
                        f"The audio is longer than the limit of {max_seconds:g} s. Please trim it."
                    )
    except ValidationError:
        raise
    except (av.FFmpegError, OSError, ValueError):
        raise ValidationError(_UNREADABLE_AUDIO) from None
    if not pieces:
        raise ValidationError("The audio is empty.")
    return rate, np.concatenate(pieces, axis=1).T


def _resample(mono: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling, trimmed or padded to exactly round(duration · target_rate) samples."""
    if rate == target_rate:
        return mono
    out = soxr.resample(mono, rate, target_rate, quality="HQ").astype(np.float32)
    want = round(len(mono) * target_rate / rate)
    if len(out) >= want:
        return out[:want]
    return np.pad(out, (0, want - len(out)))
