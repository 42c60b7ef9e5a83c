"""One audio reader: the same speech as int16, int32, uint8 or float32 gives the same samples, the same features
and the same audio in the mp4, whichever way it enters (a file for the CLI and the app, an array for the
pipeline, a piece for the live feed)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from app.live_audio import decode_mic_piece
from app.validation import validate_audio
from avatars.base import GenerationRequest
from avatars.liveavatar.cli import main
from avatars.liveavatar.loading import build_tiny_pipeline
from avatars.liveavatar.streaming.audio_timeline import AudioTimeline
from avatars.media.audio import pcm_to_float32, read_audio_file

EXAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "examples"
RATE = 16_000
# Largest step of each format on the [-1, 1) scale: the quantization a comparison must allow.
FORMATS = {"PCM_16": (np.int16, 2**-15), "PCM_32": (np.int32, 2**-31), "PCM_U8": (np.uint8, 2**-7)}


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """1.2 s of the shared example speech at 16 kHz, as float32 exactly representable in every format."""
    samples, rate = sf.read(EXAMPLES / "fashion_blogger.wav", dtype="float32")
    assert rate == 24_000
    mono = samples[: int(1.2 * rate) : 3][: int(1.2 * RATE)]  # every third sample: 16 kHz without a resampler
    return (np.round(mono * 127) / 128).astype(np.float32)  # on the uint8 grid, so every format holds it


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


def as_pcm(x: np.ndarray, dtype) -> np.ndarray:
    if np.dtype(dtype).kind == "u":
        return np.round(x * 128 + 128).astype(dtype)
    full = 2 ** (8 * np.dtype(dtype).itemsize - 1)
    return np.round(x.astype(np.float64) * full).astype(dtype)


def test_integer_pcm_lands_on_the_float_scale_unsigned_included(speech) -> None:
    for dtype, step in FORMATS.values():
        np.testing.assert_allclose(pcm_to_float32(as_pcm(speech, dtype)), speech, atol=step / 2)
    # uint8 is centred on 128: silence is 0, not 0.5 (the old encoder path mapped it to [0, 1)).
    assert pcm_to_float32(np.array([0, 128, 255], dtype=np.uint8)).tolist() == [-1.0, 0.0, 127 / 128]
    stereo = np.stack([as_pcm(speech, np.int16), as_pcm(-speech, np.int16)], axis=1)
    np.testing.assert_allclose(pcm_to_float32(stereo), 0.0, atol=2**-15)


@pytest.mark.parametrize("subtype", [*FORMATS, "FLOAT"])
def test_every_wav_format_reads_to_the_same_samples_in_cli_app_and_live_feed(
    speech, subtype, tmp_path
) -> None:
    path = tmp_path / f"speech-{subtype}.wav"
    sf.write(path, speech, RATE, subtype=subtype)
    step = FORMATS.get(subtype, (None, 0.0))[1]
    samples, rate, channels = read_audio_file(path)
    assert (rate, channels) == (RATE, 1)
    np.testing.assert_allclose(samples, speech, atol=step / 2 + 1e-7)
    np.testing.assert_array_equal(validate_audio(path, target_rate=RATE).samples, samples)
    np.testing.assert_array_equal(decode_mic_piece(str(path))[1], samples)


def features(pipe, audio: np.ndarray) -> torch.Tensor:
    timeline = AudioTimeline(audio, RATE, pipe.audio_encoder)
    return torch.cat([block for block, _ in timeline.feature_blocks()])


@pytest.mark.parametrize("name", list(FORMATS))
def test_integer_arrays_give_the_pipeline_the_same_features_and_audio(pipe, speech, name) -> None:
    dtype, step = FORMATS[name]
    reference = features(pipe, speech)
    quantized = features(pipe, as_pcm(speech, dtype))
    # The samples are the same to the last bit (the speech is on every format's grid), so the features are too.
    torch.testing.assert_close(quantized, reference, rtol=0, atol=0)
    portrait = np.asarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3)), dtype=np.uint8)
    request = GenerationRequest(portrait=portrait, audio=as_pcm(speech, dtype), sample_rate=RATE)
    chunk = next(iter(pipe.stream(request)))
    start = 3 * RATE // 25  # the first block drops its first 3 frames, and their audio
    np.testing.assert_allclose(chunk.audio, speech[start : start + len(chunk.audio)], atol=step / 2)


def mp4_audio(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.concatenate([f.to_ndarray().mean(axis=0) for f in container.decode(audio=0)])


def test_int16_and_float_wav_give_the_same_audio_in_the_mp4(pipe, speech, tmp_path) -> None:
    portrait = str(EXAMPLES / "man.png")
    tracks = []
    for subtype in ("PCM_16", "FLOAT"):
        wav, out = tmp_path / f"{subtype}.wav", tmp_path / f"{subtype}.mp4"
        sf.write(wav, speech, RATE, subtype=subtype)
        argv = ["--portrait", portrait, "--audio", str(wav), "--policy", "full", "--max-area", "4096",
                "--out", str(out)]  # fmt: skip
        assert main(argv, pipe) == 0
        tracks.append(mp4_audio(out))
    int16, floats = tracks
    assert len(int16) == len(floats) > RATE // 4
    assert np.abs(floats).max() > 0.05  # real speech, not silence
    np.testing.assert_array_equal(int16, floats)  # the samples were equal, so the encoded audio is too
