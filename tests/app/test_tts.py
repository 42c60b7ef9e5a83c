"""Offline speech with espeak-ng: real, non-silent audio; clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app import tts
from app.validation import ValidationError, validate_audio


def test_espeak_ng_is_installed() -> None:
    assert tts.espeak_ng_path() is not None, (
        "espeak-ng is a system requirement (scripts/setup.sh installs it)"
    )


def test_speech_is_real_and_non_silent(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    short = tts.synthesize("Hello.", run_dir)
    long = tts.synthesize("Hello there. This sentence is a good deal longer than the first one.", run_dir)
    for speech in (short, long):
        assert speech.samples.dtype == np.float32 and speech.samples.ndim == 1
        assert speech.sample_rate > 0
        assert float(np.sqrt(np.mean(speech.samples**2))) > 0.01
        assert np.abs(speech.samples).max() <= 1.0
    assert long.seconds > 2 * short.seconds  # more words, more speech
    assert list(run_dir.iterdir()) == [], "the temporary wav must be deleted"
    checked = validate_audio((long.sample_rate, long.samples), target_rate=16_000)
    assert checked.seconds == pytest.approx(long.seconds, abs=1e-3)


def test_text_that_looks_like_an_option_is_spoken_not_obeyed(tmp_path: Path) -> None:
    hijack = tmp_path / "hijack.wav"
    speech = tts.synthesize(f"--help -w {hijack}", tmp_path)
    assert speech.seconds > 0.5
    assert not hijack.exists()


def test_speaking_rate_changes_duration(tmp_path: Path) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    slow = tts.synthesize(text, tmp_path, words_per_minute=100)
    fast = tts.synthesize(text, tmp_path, words_per_minute=300)
    assert slow.seconds > 1.8 * fast.seconds


def test_too_long_text_is_refused_before_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tts, "espeak_ng_path", lambda: pytest.fail("espeak-ng must not run"))
    with pytest.raises(ValidationError, match="501 characters long; the limit is 500"):
        tts.synthesize("x" * 501, tmp_path)


def test_missing_espeak_ng_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tts, "espeak_ng_path", lambda: None)
    with pytest.raises(tts.TextToSpeechError) as err:
        tts.synthesize("Hello.", tmp_path)
    assert "needs the espeak-ng program, which is not installed" in str(err.value)
    assert "apt-get install espeak-ng" in str(err.value)


@pytest.mark.parametrize("voice", ["en us", "-w", "../x", ""])
def test_odd_voice_names_are_refused(tmp_path: Path, voice: str) -> None:
    with pytest.raises(ValueError, match="voice must be"):
        tts.synthesize("Hello.", tmp_path, voice=voice)
