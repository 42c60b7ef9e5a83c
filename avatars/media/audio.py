"""Speech in: the one reader of audio files and the one conversion of PCM samples.

The CLI, the app's upload check, the live microphone feed, text-to-speech and the streaming pipeline all take
their audio through here, so the same signal gives the same samples whichever way it arrives: integer PCM is
scaled to [-1, 1) (unsigned PCM around its midpoint), several channels are averaged to mono, and resampling is
soxr's band-limited "HQ" converter.

Why not `librosa.load`: it decodes a whole file before anything can check its length (a public app must refuse an
hour-long upload before decoding it), and it falls back to the deprecated audioread for compressed formats.
libsndfile (WAV, FLAC, OGG) and PyAV (MP3, M4A/AAC, WebM) read every common format, with the length checked
before or while decoding. They and soxr are imported where they are used: the streaming loop converts PCM at the
model's rate with numpy alone, so the benchmark runs on a bare CUDA machine that has none of them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

MAX_CHANNELS = 8  # more "channels" than this means a (channels, samples) array was passed the wrong way round
AUDIO_CONTAINERS = ("mp3", "mov,mp4,m4a,3gp,3g2,mj2", "ogg", "matroska,webm", "flac", "wav", "aac")
UNREADABLE = "The audio file could not be decoded. Supported: WAV, FLAC, OGG, MP3, M4A/AAC, WebM."


class AudioReadError(ValueError):
    """Audio that cannot be used; the message is in plain words and names no server path."""


def pcm_to_float32(samples: np.ndarray) -> np.ndarray:
    """Mono float32 from PCM shaped (samples,) or (samples, channels).

    Signed integers are divided by 2^(bits-1), unsigned ones centred on 2^(bits-1) first, so every integer format
    lands in [-1, 1); floats are taken as they are (a float above full scale stays above it: callers decide).
    """
    data = np.asarray(samples)
    if data.ndim not in (1, 2) or (data.ndim == 2 and not 1 <= data.shape[1] <= MAX_CHANNELS):
        raise AudioReadError(
            f"Audio samples must be shaped (samples,) or (samples, channels ≤ {MAX_CHANNELS}), got {data.shape}."
        )
    if data.dtype.kind in "iu":
        info = np.iinfo(data.dtype)
        middle = 0 if data.dtype.kind == "i" else (int(info.max) + 1) // 2
        full_scale = int(info.max) - middle + 1
        data = (data.astype(np.float64) - middle) / full_scale
    elif data.dtype.kind != "f":
        raise AudioReadError(f"Audio samples must be integer or float PCM, got {data.dtype}.")
    if data.ndim == 2:
        data = data.mean(axis=1, dtype=np.float64)
    mono = data.astype(np.float32)
    if not np.isfinite(mono).all():
        raise AudioReadError("The audio contains invalid sample values (NaN or infinity).")
    return mono


def read_audio_file(path: str | Path, *, max_seconds: float | None = None) -> tuple[np.ndarray, int, int]:
    """(mono float32 samples, sample rate, channels) of an audio file, at the file's own rate.

    With `max_seconds`, a longer file is refused before it is decoded (libsndfile) or as soon as decoding passes
    the limit (PyAV).
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioReadError("The audio file could not be found.")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return _read_with_pyav(path, max_seconds)
    if max_seconds is not None and info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
        raise _too_long(info.frames / info.samplerate, max_seconds)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        raise AudioReadError(UNREADABLE) from None
    if data.shape[0] == 0:
        raise AudioReadError("The audio is empty.")
    return pcm_to_float32(data), int(rate), data.shape[1]


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling of mono float32 to ceil(duration · target_rate) samples: what `librosa.load(sr=)`
    returns, so whole-clip features equal the official pipeline's (which loads its audio that way)."""
    if rate == target_rate:
        return samples
    import soxr

    out = soxr.resample(samples, rate, target_rate, quality="HQ").astype(np.float32)
    want = math.ceil(len(samples) * target_rate / rate)
    if len(out) >= want:
        return out[:want]
    return np.pad(out, (0, want - len(out)))


def _too_long(seconds: float, limit: float) -> AudioReadError:
    return AudioReadError(f"The audio is {seconds:.1f} s long; the limit is {limit:g} s. Please trim it.")


def _read_with_pyav(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int, int]:
    import av

    try:
        with av.open(str(path)) as container:
            if container.format.name not in AUDIO_CONTAINERS or not container.streams.audio:
                raise AudioReadError(UNREADABLE)
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate
            limit = math.floor(max_seconds * rate) + 1 if rate and max_seconds is not None else None
            pieces, total = [], 0
            # Planar float at the source's own rate and layout; the downmix follows.
            resampler = av.AudioResampler(format="fltp")
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray())
                    total += out.samples
                if limit is not None and total > limit:
                    raise AudioReadError(
                        f"The audio is longer than the limit of {max_seconds:g} s. Please trim it."
                    )
    except AudioReadError:
        raise
    except (av.FFmpegError, OSError, ValueError):
        raise AudioReadError(UNREADABLE) from None
    if not pieces or not rate:
        raise AudioReadError("The audio is empty.")
    planar = np.concatenate(pieces, axis=1)  # [channels, samples]
    return pcm_to_float32(planar.T), int(rate), planar.shape[0]
