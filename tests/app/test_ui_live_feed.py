"""Live microphone feed: each reader gets all the audio at its rate, arrivals are logged for the delay figure,
and the feed ends cleanly (on close, or at the length limit)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from app.live_audio import LiveAudioFeed, decode_mic_piece
from app.run_view import DelayMeter
from app.validation import ValidationError


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def noise(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(round(seconds * rate))).astype(np.float32)


def test_two_readers_each_get_all_the_audio_resampled_as_one_piece() -> None:
    feed = LiveAudioFeed()
    audio = noise(1.0, 48000)
    for start in range(0, len(audio), 12000):  # four 0.25 s pieces, as the browser sends them
        feed.push(48000, audio[start : start + 12000])
    feed.close()
    reference = soxr.resample(audio, 48000, 16000, quality="HQ")
    for _ in range(2):  # compare mode: the Full and the ISPA run read the same speech
        got = np.concatenate(list(feed.pieces(16000)))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, reference)


def test_pieces_at_the_feed_rate_pass_through_untouched() -> None:
    feed = LiveAudioFeed()
    pieces = [noise(0.3, 16000, seed) for seed in range(3)]
    for piece in pieces:
        feed.push(16000, piece)
    feed.close()
    got = list(feed.pieces(16000))
    assert len(got) == 3
    for a, b in zip(got, pieces, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_reader_waits_for_audio_and_finishes_after_close() -> None:
    feed = LiveAudioFeed()
    received: list[np.ndarray] = []
    reader = threading.Thread(target=lambda: received.extend(feed.pieces(16000)))
    reader.start()
    first, second = noise(0.5, 16000, 1), noise(0.5, 16000, 2)
    feed.push(16000, first)
    feed.push(16000, second)
    feed.close()
    reader.join(timeout=60)  # a guard against a hang, not a speed limit
    assert not reader.is_alive()
    np.testing.assert_array_equal(np.concatenate(received), np.concatenate([first, second]))


def test_arrival_times_map_audio_positions_to_when_they_arrived() -> None:
    clock = FakeClock(10.0)
    feed = LiveAudioFeed(clock=clock)
    feed.push(16000, noise(0.5, 16000))  # audio [0, 0.5) s arrives at t = 10
    clock.now = 11.0
    feed.push(16000, noise(0.5, 16000))  # [0.5, 1.0) s at t = 11
    assert feed.arrival_time(0.3) == 10.0
    assert feed.arrival_time(0.5) == 10.0
    assert feed.arrival_time(0.7) == 11.0
    assert feed.arrival_time(1.0) == 11.0
    assert feed.arrival_time(1.2) is None  # not spoken yet
    clock.now = 12.5
    feed.close()
    assert feed.arrival_time(1.2) == 12.5  # a padded last block is complete when the recording stops
    assert feed.seconds == pytest.approx(1.0)


def test_audio_past_the_limit_is_dropped_and_closes_the_feed() -> None:
    feed = LiveAudioFeed(max_seconds=1.0)
    feed.push(8000, noise(0.6, 8000, 1))
    assert not feed.closed
    feed.push(8000, noise(0.6, 8000, 2))
    assert feed.closed and feed.truncated
    assert feed.seconds == pytest.approx(1.0)
    feed.push(8000, noise(0.2, 8000, 3))  # ignored once closed
    assert sum(len(p) for p in feed.pieces(8000)) == 8000


def test_a_changing_microphone_rate_is_refused() -> None:
    feed = LiveAudioFeed()
    feed.push(48000, noise(0.1, 48000))
    with pytest.raises(ValidationError, match="sample rate changed"):
        feed.push(44100, noise(0.1, 44100))


def test_pcm_pieces_become_mono_float_within_full_scale() -> None:
    pcm16 = np.array([[-32768, 0], [16384, 16384], [32767, -32767]], dtype=np.int16)
    np.testing.assert_allclose(decode_mic_piece((8000, pcm16))[1], [-0.5, 0.5, 0.0], atol=1 / 32768)
    pcm8 = np.array([0, 128, 255], dtype=np.uint8)
    np.testing.assert_allclose(decode_mic_piece((8000, pcm8))[1], [-1.0, 0.0, 127 / 128])
    assert decode_mic_piece((8000, np.array([2.0, -3.0])))[1].tolist() == [1.0, -1.0]


def test_a_streamed_wav_piece_decodes_to_its_samples(tmp_path: Path) -> None:
    samples = noise(0.25, 48000)
    path = tmp_path / "piece.wav"
    sf.write(path, np.stack([samples, samples], axis=1), 48000, subtype="PCM_16")
    rate, mono = decode_mic_piece(str(path))
    assert rate == 48000
    np.testing.assert_allclose(mono, samples, atol=1 / 32768)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not a wav")
    with pytest.raises(ValidationError, match="could not be decoded"):
        decode_mic_piece(str(garbage))


def test_delay_meter_measures_from_arrival_to_hand_over() -> None:
    clock = FakeClock(0.0)
    feed = LiveAudioFeed(clock=clock)
    for arrival in (1.0, 1.25, 1.5, 1.75):  # 0.25 s pieces: 1.0 s of speech by t = 1.75
        clock.now = arrival
        feed.push(16000, noise(0.25, 16000))
    meter = DelayMeter(feed, clock=clock)
    meter.chunk_ready(0.48)  # its audio was complete with the piece that ended at 0.5 s (arrived t = 1.25)
    clock.now = 2.0
    assert meter.summary() is None  # nothing handed over yet
    meter.chunk_ready(0.96)  # piece ending at 1.0 s, arrived t = 1.75
    meter.handed_over()  # one segment holding both chunks, yielded at t = 2.0
    assert meter.delays == pytest.approx([0.75, 0.25])
    summary = meter.summary()
    assert summary == {
        "latest_s": pytest.approx(0.25),
        "mean_s": pytest.approx(0.5),
        "max_s": pytest.approx(0.75),
        "chunks": 2,
    }
