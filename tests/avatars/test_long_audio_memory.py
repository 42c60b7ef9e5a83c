"""Long speech known in full: past the one-pass length its features come in overlapping windows, so the audio
path's peak of live tensors does not grow with the clip (it did with one pass over the whole clip)."""

from __future__ import annotations

import numpy as np
import pytest

from avatars.liveavatar.encoders.audio import AudioEncoder
from avatars.liveavatar.encoders.tiny import tiny_wav2vec2
from avatars.liveavatar.streaming import audio_timeline
from bench.live_tensors import LiveTensorPeak


@pytest.fixture
def short_windows(monkeypatch):
    """The same code path at test scale: one pass up to 0.5 s, then windows of one block."""
    windows = {"group_frames": 12, "left_context_s": 0.3, "lookahead_s": 0.1}
    monkeypatch.setattr(audio_timeline, "ONE_PASS_MAX_SECONDS", 0.5, raising=False)
    monkeypatch.setattr(audio_timeline, "LONG_CLIP_WINDOWS", windows, raising=False)


def _speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 150 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _audio_path_peak(seconds: float) -> tuple[int, int]:
    encoder = AudioEncoder(*tiny_wav2vec2(0))
    frames = 0
    with LiveTensorPeak() as live:
        for _block, real in audio_timeline.AudioTimeline(_speech(seconds), 16000, encoder).feature_blocks():
            frames += real  # each block is dropped once used, as the block loop does
    return live.peak, frames


def test_the_audio_path_peak_stays_flat_as_the_clip_grows(short_windows):
    short_peak, short_frames = _audio_path_peak(1.5)
    long_peak, long_frames = _audio_path_peak(4.5)
    assert (short_frames, long_frames) == (37, 112)  # every frame the one pass would give, no more
    assert long_peak <= 1.05 * short_peak


def test_a_clip_up_to_the_one_pass_length_gets_the_official_features(short_windows):
    encoder = AudioEncoder(*tiny_wav2vec2(0))
    audio = _speech(0.5)
    official = encoder.frame_features(audio, 16000)
    blocks = list(audio_timeline.AudioTimeline(audio, 16000, encoder).feature_blocks())
    assert sum(real for _, real in blocks) == len(official)
    got = np.concatenate([block[:real].numpy() for block, real in blocks])
    assert np.array_equal(got, official.numpy())
