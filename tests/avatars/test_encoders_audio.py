"""Audio loading and the official per-video-frame wav2vec2 features, on the tiny wav2vec2."""

import copy
import math
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from avatars.liveavatar.encoders.audio import AudioEncoder, audio_16k, official_frame_features
from avatars.liveavatar.encoders.tiny import TINY_AUDIO_DIM, TINY_AUDIO_LAYERS, tiny_wav2vec2
from avatars.media.audio import read_audio_file
from tests.fixtures.tiny_checkpoints import write_wav2vec2

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "examples"


@pytest.fixture(scope="module")
def encoder():
    return AudioEncoder(*tiny_wav2vec2())


def _stereo(seconds, rate, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    left = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    right = 0.2 * np.sin(2 * np.pi * 330 * t)
    return np.stack([left, right], axis=1).astype(np.float32)


def test_44k_stereo_file_is_downmixed_then_resampled(tmp_path):
    stereo = _stereo(1.3, 44100)
    sf.write(tmp_path / "voice.wav", stereo, 44100, subtype="FLOAT")
    samples, rate, channels = read_audio_file(tmp_path / "voice.wav")
    assert (rate, channels) == (44100, 2)
    audio = audio_16k(samples, rate)
    expected = librosa.resample(stereo.mean(axis=1), orig_sr=44100, target_sr=16000)
    assert audio.dtype == np.float32 and audio.shape == (math.ceil(stereo.shape[0] * 16000 / 44100),)
    np.testing.assert_allclose(audio, expected, atol=1e-6)


def test_int16_array_is_scaled_like_the_float_file(tmp_path):
    stereo = _stereo(0.7, 44100, seed=1)
    pcm = np.round(stereo * 32767).astype(np.int16)
    from_array = audio_16k(pcm, sample_rate=44100)
    expected = librosa.resample(
        (pcm / 32768.0).mean(axis=1).astype(np.float32), orig_sr=44100, target_sr=16000
    )
    np.testing.assert_allclose(from_array, expected, atol=1e-6)


def _official_bucket_rows(steps_30hz, batch_frames=48, fps=25, video_rate=30):
    """Rows of the official get_audio_embed_bucket_fps (m=0): 30 Hz indices, None where it zero-fills."""
    min_batch_num = int(steps_30hz / (batch_frames * (video_rate / fps))) + 1
    bucket_num = min_batch_num * batch_frames
    time_points = np.linspace(0, bucket_num / fps, bucket_num, endpoint=False)
    total = math.ceil(bucket_num / fps * video_rate)  # the audio steps plus the official padding
    indices = np.clip(np.round(time_points * video_rate).astype(int), 0, total - 1)
    return [int(i) if i < steps_30hz else None for i in indices]


@pytest.mark.parametrize("steps_50hz", [2, 3, 50, 149, 251, 1000, 1213])
def test_per_frame_features_follow_the_official_bucket(steps_50hz):
    hidden = torch.randn(3, steps_50hz, 8, generator=torch.Generator().manual_seed(steps_50hz))
    features = official_frame_features(hidden)

    steps_30hz = int(steps_50hz / 50.0 * 30)
    at_30hz = F.interpolate(
        hidden.transpose(1, 2), size=steps_30hz, mode="linear", align_corners=True
    ).transpose(1, 2)
    rows = _official_bucket_rows(steps_30hz)
    real = [r for r in rows if r is not None]
    assert rows[: len(real)] == real  # the zero-filled rows are exactly the tail
    assert features.shape == (len(real), 3, 8)
    torch.testing.assert_close(features, at_30hz[:, real].permute(1, 0, 2))


@pytest.mark.parametrize("seconds", [0.5, 1.0, 2.48, 3.0])
def test_one_feature_per_video_frame_of_the_audio(encoder, seconds):
    audio = np.random.default_rng(0).standard_normal(int(seconds * 16000)).astype(np.float32) * 0.1
    features = encoder.frame_features(audio, sample_rate=16000)
    assert features.shape[1:] == (TINY_AUDIO_LAYERS + 1, TINY_AUDIO_DIM)
    assert abs(features.shape[0] - seconds * 25) <= 2
    # every hidden state is used, none is a zero fill
    assert torch.all(features.abs().sum(dim=-1) > 0)


def test_example_file_features(encoder):
    samples, rate, _ = read_audio_file(EXAMPLES / "cyclops_baker.wav")
    audio = audio_16k(samples, rate)
    features = encoder.frame_features(audio[: 16000 * 2], sample_rate=16000)
    assert features.shape == (
        official_frame_features(encoder.hidden_states(audio[: 16000 * 2])).shape[0],
        3,
        32,
    )
    assert abs(features.shape[0] - 50) <= 2


def test_hidden_states_are_normalised_per_clip(encoder):
    audio = np.random.default_rng(3).standard_normal(8000).astype(np.float32)
    torch.testing.assert_close(
        encoder.hidden_states(audio), encoder.hidden_states(audio * 7.0 + 0.5), atol=1e-4, rtol=1e-4
    )


def test_bad_audio_raises_value_error(encoder, tmp_path):
    with pytest.raises(ValueError, match="could not be found"):
        read_audio_file(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("this is not audio")
    with pytest.raises(ValueError, match="could not be decoded"):
        read_audio_file(tmp_path / "text.wav")
    with pytest.raises(ValueError, match="empty"):
        audio_16k(np.zeros(0, dtype=np.float32), sample_rate=16000)
    with pytest.raises(ValueError, match="NaN"):
        audio_16k(np.array([0.0, np.nan], dtype=np.float32), sample_rate=16000)
    with pytest.raises(ValueError, match="sample_rate"):
        audio_16k(np.zeros(10, dtype=np.float32), sample_rate=0)
    with pytest.raises(ValueError, match=r"\(samples, channels"):
        audio_16k(np.zeros((2, 3, 4), dtype=np.float32), sample_rate=16000)
    with pytest.raises(ValueError, match="too short"):
        encoder.frame_features(np.zeros(500, dtype=np.float32), sample_rate=16000)


def test_saved_wav2vec2_folder_loads_back(encoder, tmp_path):
    write_wav2vec2(tmp_path / "wav2vec2-large-xlsr-53-english")
    loaded = AudioEncoder.from_pretrained(tmp_path / "wav2vec2-large-xlsr-53-english")
    audio = np.random.default_rng(5).standard_normal(4000).astype(np.float32)
    assert loaded.num_hidden_states == TINY_AUDIO_LAYERS + 1
    torch.testing.assert_close(loaded.hidden_states(audio), encoder.hidden_states(audio))


def test_a_bf16_encoder_gives_the_official_bf16_features(encoder):
    """The official numerics: wav2vec2 in bf16, features cast to bf16; fp32 stays fp32."""
    audio = np.sin(np.linspace(0, 2000, 16000)).astype(np.float32)
    exact = encoder.frame_features(audio, 16000)
    assert encoder.dtype == torch.float32 and not torch.equal(exact, exact.bfloat16().float())
    half = AudioEncoder(copy.deepcopy(encoder.model).to(torch.bfloat16), encoder.feature_extractor)
    official = half.frame_features(audio, 16000)
    assert half.dtype == torch.bfloat16 and official.dtype == torch.float32
    assert torch.equal(official, official.bfloat16().float())  # every value is a bf16 number
    assert 0 < ((official - exact).norm() / exact.norm()).item() < 0.05
