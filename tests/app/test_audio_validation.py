"""Audio checks: unreadable, empty, silent and too-long input; downmix and resampling that keep pitch."""

from __future__ import annotations

import math
import re
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from app.validation import ValidationError, validate_audio

TARGET = 16_000


def assert_no_server_path(message: str, *dirs: Path) -> None:
    for d in dirs:
        assert str(d) not in message
    assert not re.search(r"(^|[\s'\"(])/[\w.-]+/", message), f"message names a path: {message}"


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def peak_frequency_and_amplitude(x: np.ndarray, rate: int) -> tuple[float, float]:
    window = np.hanning(len(x))
    spectrum = np.abs(np.fft.rfft(x * window))
    k = int(np.argmax(spectrum))
    return k * rate / len(x), 2 * spectrum[k] / window.sum()


def write_m4a(path: Path, samples: np.ndarray, rate: int) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_real_speech_is_resampled_to_the_backend_rate(examples_dir: Path) -> None:
    path = examples_dir / "fashion_blogger.wav"
    original, rate = sf.read(path, dtype="float32")
    check = validate_audio(path, target_rate=TARGET)
    assert (check.original_sample_rate, check.original_channels, check.sample_rate) == (rate, 1, TARGET)
    assert check.samples.dtype == np.float32 and check.samples.ndim == 1
    assert len(check.samples) == math.ceil(len(original) * TARGET / rate)  # as librosa.load(sr=) gives
    assert check.seconds == pytest.approx(len(original) / rate, abs=1 / TARGET)
    reference = resample_poly(original.astype(np.float64), TARGET, rate)[: len(check.samples)]
    assert np.corrcoef(reference, check.samples)[0, 1] > 0.999
    assert check.warnings == []


def test_stereo_44k1_file_becomes_mono_16k_with_pitch_kept(tmp_path: Path) -> None:
    rate = 44_100
    stereo = np.stack([sine(440, 3.0, rate, 0.4), sine(440, 3.0, rate, 0.2)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, rate, subtype="PCM_16")
    check = validate_audio(path, target_rate=TARGET)
    assert check.original_channels == 2 and check.original_sample_rate == rate
    assert len(check.samples) == math.ceil(len(stereo) * TARGET / rate)
    freq, amplitude = peak_frequency_and_amplitude(check.samples, TARGET)
    assert freq == pytest.approx(440, abs=TARGET / len(check.samples))
    assert amplitude == pytest.approx(0.3, abs=0.01)  # the mean of the two channels


def test_8k_int16_from_gradio_numpy_is_upsampled_with_pitch_kept() -> None:
    rate = 8_000
    pcm = np.round(sine(300, 2.0, rate, 0.5) * 32767).astype(np.int16)
    check = validate_audio((rate, pcm), target_rate=TARGET)
    assert len(check.samples) == 2 * len(pcm)
    freq, amplitude = peak_frequency_and_amplitude(check.samples, TARGET)
    assert freq == pytest.approx(300, abs=TARGET / len(check.samples))
    assert amplitude == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("rate", "n_samples"), [(44_100, 88_201), (22_050, 33_077), (48_000, 47_999), (32_000, 88_201)]
)
def test_resampled_length_is_the_duration_rounded_up(rate: int, n_samples: int) -> None:
    """ceil(duration · rate), what `librosa.load(sr=)` gives the official pipeline; 88 201 samples at 32 kHz is an
    exact half."""
    samples = sine(440, n_samples / rate, rate)[:n_samples]
    assert len(samples) == n_samples
    check = validate_audio((rate, samples), target_rate=TARGET)
    assert len(check.samples) == math.ceil(n_samples * TARGET / rate)


def test_same_rate_input_is_passed_through_exactly() -> None:
    samples = sine(200, 1.0, TARGET)
    check = validate_audio((TARGET, samples), target_rate=TARGET)
    np.testing.assert_array_equal(check.samples, samples)


@pytest.mark.parametrize(("dtype", "full_scale"), [(np.int32, 2**31), (np.uint8, 128)])
def test_integer_pcm_is_scaled_to_unit_range(dtype: type, full_scale: int) -> None:
    values = np.round(sine(250, 1.0, TARGET, 0.5) * (full_scale - 1)).astype(np.int64)
    if dtype is np.uint8:
        values = values + 128
    check = validate_audio((TARGET, values.astype(dtype)), target_rate=TARGET)
    assert np.abs(check.samples).max() == pytest.approx(0.5, abs=0.01)


def test_compressed_container_is_decoded_through_pyav(tmp_path: Path) -> None:
    path = tmp_path / "speech.m4a"
    write_m4a(path, sine(440, 2.0, 24_000), 24_000)
    check = validate_audio(path, target_rate=TARGET)
    assert check.original_sample_rate == 24_000
    assert abs(check.seconds - 2.0) < 0.1  # AAC adds up to one frame of padding
    freq, _ = peak_frequency_and_amplitude(check.samples, TARGET)
    assert freq == pytest.approx(440, abs=1.0)


@pytest.mark.parametrize(
    "payload",
    [np.random.default_rng(0).bytes(20_000), b"RIFF\x00\x00\x00\x00WAVEjunk", b"just text\n"],
)
def test_corrupt_audio_is_refused(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "speech.wav"
    path.write_bytes(payload)
    with pytest.raises(ValidationError) as err:
        validate_audio(path, target_rate=TARGET)
    assert "could not be decoded. Supported: WAV" in str(err.value)
    assert_no_server_path(str(err.value), tmp_path)


def test_empty_audio_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16_000)
    with pytest.raises(ValidationError, match="The audio is empty"):
        validate_audio(path, target_rate=TARGET)
    with pytest.raises(ValidationError, match="The audio is empty"):
        validate_audio((16_000, np.zeros(0, dtype=np.int16)), target_rate=TARGET)


@pytest.mark.parametrize("level", [0.0, 1e-4])
def test_silent_audio_is_refused(tmp_path: Path, level: float) -> None:
    path = tmp_path / "quiet.wav"
    noise = level * np.random.default_rng(1).standard_normal(32_000)
    sf.write(path, noise.astype(np.float32), 16_000, subtype="FLOAT")
    with pytest.raises(ValidationError, match=r"silent \(its level is below -60 dBFS\)"):
        validate_audio(path, target_rate=TARGET)


@pytest.mark.parametrize("offset", [0.25, -0.5, 16_000])
def test_a_dc_offset_alone_is_silent(tmp_path: Path, offset: float) -> None:
    """A constant far from zero has an RMS of |offset| but no sound: the level is measured about the mean."""
    if offset == 16_000:  # int16 PCM sitting at a constant code
        samples = np.full(32_000, 16_000, dtype=np.int16)
    else:
        samples = np.full(32_000, offset, dtype=np.float32)
    with pytest.raises(ValidationError, match=r"silent \(its level is below -60 dBFS\)"):
        validate_audio((16_000, samples), target_rate=TARGET)
    # The same offset under a quiet but real tone is speech-level sound, and is accepted.
    tone = sine(200, 2.0, 16_000, amplitude=0.05) + (0.25 if offset == 16_000 else offset)
    assert validate_audio((16_000, tone.astype(np.float32)), target_rate=TARGET).seconds == 2.0


@pytest.mark.parametrize("n_samples", [1, 1599])
def test_a_few_samples_are_too_short_not_silent(tmp_path: Path, n_samples: int) -> None:
    path = tmp_path / "short.wav"
    sf.write(path, np.full(n_samples, 0.5, dtype=np.float32), 16_000, subtype="FLOAT")
    with pytest.raises(ValidationError) as err:
        validate_audio(path, target_rate=TARGET)
    assert str(err.value).startswith(f"The audio is too short ({n_samples} sample(s),")
    assert str(err.value).endswith("it needs at least 0.1 s of speech.")
    # At the limit it is checked for sound as usual.
    sf.write(path, sine(300, 0.1, 16_000), 16_000, subtype="FLOAT")
    assert validate_audio(path, target_rate=TARGET).seconds == 0.1


def test_too_long_audio_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    sf.write(path, sine(440, 5.0, 16_000), 16_000)
    with pytest.raises(ValidationError) as err:
        validate_audio(path, target_rate=TARGET, max_seconds=3)
    assert "The audio is 5.0 s long; the limit is 3 s" in str(err.value)
    assert_no_server_path(str(err.value), tmp_path)
    assert validate_audio(path, target_rate=TARGET, max_seconds=5).seconds == pytest.approx(5.0)


def test_too_long_audio_is_refused_for_numpy_and_pyav_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="4.0 s long; the limit is 3 s"):
        validate_audio((8_000, sine(440, 4.0, 8_000)), target_rate=TARGET, max_seconds=3)
    path = tmp_path / "long.m4a"
    write_m4a(path, sine(440, 5.0, 16_000), 16_000)
    with pytest.raises(ValidationError, match="longer than the limit of 3 s"):
        validate_audio(path, target_rate=TARGET, max_seconds=3)


def test_invalid_values_and_missing_input_are_refused(tmp_path: Path) -> None:
    broken = sine(440, 1.0, TARGET)
    broken[100] = np.nan
    with pytest.raises(ValidationError, match="invalid sample values"):
        validate_audio((TARGET, broken), target_rate=TARGET)
    with pytest.raises(ValidationError, match="Please provide the driving audio"):
        validate_audio(None, target_rate=TARGET)
    with pytest.raises(ValidationError) as err:
        validate_audio(tmp_path / "gone.wav", target_rate=TARGET)
    assert "could not be found" in str(err.value)
    assert_no_server_path(str(err.value), tmp_path)
    with pytest.raises(ValidationError, match="invalid sample rate"):
        validate_audio((0, sine(440, 1.0, TARGET)), target_rate=TARGET)


def test_over_full_scale_audio_is_clipped_with_a_warning() -> None:
    check = validate_audio((TARGET, sine(440, 1.0, TARGET, amplitude=1.5)), target_rate=TARGET)
    assert np.abs(check.samples).max() == pytest.approx(1.0)
    assert check.warnings == ["The audio went beyond full scale and was clipped."]
