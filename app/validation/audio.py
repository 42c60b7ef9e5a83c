"""Driving-audio check: refuse empty, too short, silent (a DC offset included) or too long audio, and return mono
float32 at the backend's sample rate. Decoding and PCM conversion are the project's one audio reader (`avatars.media.audio`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.validation.errors import ValidationError
from avatars.media.audio import AudioReadError, pcm_to_float32, read_audio_file, resample

MAX_AUDIO_SECONDS = 60.0
MIN_AUDIO_SECONDS = 0.1  # shorter than any spoken syllable
SILENCE_RMS = 1e-3  # -60 dBFS: quieter than any usable speech recording


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
    try:
        if isinstance(source, tuple):
            rate, data = source
            data = np.asarray(data)
            mono, channels = pcm_to_float32(data), data.shape[1] if data.ndim == 2 else 1
        else:
            mono, rate, channels = read_audio_file(source, max_seconds=max_seconds)
    except AudioReadError as err:
        raise ValidationError(str(err)) from None
    if not (isinstance(rate, numbers.Integral) and rate > 0):
        raise ValidationError("The audio has an invalid sample rate.")
    if mono.size == 0:
        raise ValidationError("The audio is empty.")
    seconds = mono.size / rate
    if seconds > max_seconds:
        raise ValidationError(
            f"The audio is {seconds:.1f} s long; the limit is {max_seconds:g} s. Please trim it."
        )
    if seconds < MIN_AUDIO_SECONDS:
        raise ValidationError(
            f"The audio is too short ({mono.size} sample(s), {seconds * 1000:.1f} ms); it needs at least "
            f"{MIN_AUDIO_SECONDS:g} s of speech."
        )
    # The level of what varies: a constant (DC) offset carries no sound, however far from zero it sits.
    centred = mono.astype(np.float64) - mono.mean(dtype=np.float64)
    rms = float(np.sqrt(np.mean(centred**2)))
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
        samples=resample(mono, int(rate), target_rate),
        sample_rate=target_rate,
        original_sample_rate=int(rate),
        original_channels=channels,
        warnings=notes,
    )
