"""Streaming audio features: independent of how the audio is cut, local to their window, equal to the whole clip
when the window covers it, and the same frame count as the offline path."""

import numpy as np
import pytest
import torch

from avatars.liveavatar.encoders.audio import AudioEncoder, audio_16k, official_frame_features
from avatars.liveavatar.encoders.audio_stream import StreamingAudioEncoder
from avatars.liveavatar.encoders.tiny import tiny_wav2vec2


@pytest.fixture(scope="module")
def encoder():
    return AudioEncoder(*tiny_wav2vec2())


def _speech(seconds, rate=16000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (
        0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.3 * np.sin(3 * t))) + 0.05 * rng.standard_normal(t.size)
    ).astype(np.float32)


def _stream(encoder, audio, piece_sizes, rate=16000, **kwargs):
    stream = StreamingAudioEncoder(encoder, rate, **kwargs)
    out, start, i = [], 0, 0
    while start < audio.shape[0]:
        size = piece_sizes[i % len(piece_sizes)]
        out.append(stream.push(audio[start : start + size]))
        start, i = start + size, i + 1
    out.append(stream.finish())
    return torch.cat(out), [o.shape[0] for o in out]


def test_pieces_of_any_size_give_identical_features(encoder):
    audio = _speech(3.1)
    whole, _ = _stream(encoder, audio, [audio.size], left_context_s=0.6, lookahead_s=0.1)
    small, counts = _stream(encoder, audio, [317, 1601, 40, 4000], left_context_s=0.6, lookahead_s=0.1)
    assert torch.equal(whole, small)
    assert sum(c > 0 for c in counts[:-1]) >= 3  # frames came out while audio was still arriving
    assert all(c % 12 == 0 for c in counts[:-1])  # in whole groups of one DiT block


def test_resampled_44k_stereo_pieces_match_the_16k_stream(encoder):
    rate = 44100
    stereo = np.stack([_speech(1.2, rate, seed=1), _speech(1.2, rate, seed=2)], axis=1)
    pieces, _ = _stream(encoder, stereo, [999, 4410, 123], rate=rate, left_context_s=0.5)
    reference, _ = _stream(encoder, audio_16k(stereo, sample_rate=rate), [16000], left_context_s=0.5)
    torch.testing.assert_close(pieces, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seconds", [0.3, 1.0, 1.77, 2.5])
def test_frame_count_equals_the_offline_count(encoder, seconds):
    audio = _speech(seconds, seed=3)
    streamed, _ = _stream(encoder, audio, [1000], left_context_s=0.4, lookahead_s=0.04)
    assert streamed.shape[0] == official_frame_features(encoder.hidden_states(audio)).shape[0]


def test_window_covering_the_clip_equals_whole_clip_hidden_states(encoder):
    audio = _speech(2.0, seed=4)
    streamed, counts = _stream(encoder, audio, [700], left_context_s=5.0, lookahead_s=5.0)
    assert counts[-1] == streamed.shape[0]  # nothing is ready before the end
    hidden = encoder.hidden_states(audio)  # [layers, T, dim]
    k = np.arange(streamed.shape[0])
    position = ((6 * k + 2) // 5) * (50 / 30) + 0.5  # nominal 50 Hz position of video frame k + the offset
    low = np.minimum(np.floor(position).astype(int), hidden.shape[1] - 1)
    high = np.minimum(low + 1, hidden.shape[1] - 1)
    w = torch.tensor(position - low, dtype=torch.float32)[None, :, None]
    expected = (hidden[:, low] * (1 - w) + hidden[:, high] * w).permute(1, 0, 2)
    torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=1e-5)


def test_features_depend_only_on_their_window(encoder):
    audio = _speech(4.0, seed=5)
    changed = audio.copy()
    changed[: 16000 // 2] = 0.5 * np.random.default_rng(9).standard_normal(8000)  # first 0.5 s differs
    kwargs = {"left_context_s": 0.5, "lookahead_s": 0.2, "group_frames": 12}
    a, _ = _stream(encoder, audio, [1600], **kwargs)
    b, _ = _stream(encoder, changed, [1600], **kwargs)
    # Group 0 (frames 0-11, 0.48 s) sees the change; from 0.5 s + 0.5 s of left context on, windows start after it.
    assert not torch.allclose(a[:12], b[:12])
    assert torch.equal(a[36:], b[36:])


def test_misuse_raises_value_error(encoder):
    with pytest.raises(ValueError, match="lookahead_s"):
        StreamingAudioEncoder(encoder, 16000, lookahead_s=0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        StreamingAudioEncoder(encoder, 0)
    stream = StreamingAudioEncoder(encoder, 16000)
    stream.push(np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match="too short"):
        stream.finish()
    with pytest.raises(ValueError, match="after finish"):
        stream.push(np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        StreamingAudioEncoder(encoder, 16000).push(np.array([np.inf], dtype=np.float32))
