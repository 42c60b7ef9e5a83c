"""Offline text-to-speech with the espeak-ng program, so typed text can drive the avatar without a network.

The text goes to espeak-ng on stdin (never as an argument, so text starting with '-' cannot become an
option), the wav it writes in the run folder is read back as mono float32 and deleted.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.validation.text import MAX_TTS_CHARS, validate_tts_text
from avatars.media.audio import read_audio_file

DEFAULT_VOICE = "en-us"
DEFAULT_WORDS_PER_MINUTE = 160
_TIMEOUT_S = 60


class TextToSpeechError(RuntimeError):
    """Speech could not be synthesised; the message says why in plain words."""


@dataclass(frozen=True)
class Speech:
    samples: np.ndarray  # mono float32
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def espeak_ng_path() -> str | None:
    return shutil.which("espeak-ng")


def synthesize(
    text: str,
    out_dir: Path,
    *,
    voice: str = DEFAULT_VOICE,
    words_per_minute: int = DEFAULT_WORDS_PER_MINUTE,
    max_chars: int = MAX_TTS_CHARS,
) -> Speech:
    """Speak `text` (checked by `validate_tts_text`, so too-long text raises `ValidationError`)."""
    cleaned = validate_tts_text(text, max_chars=max_chars).text
    if not re.fullmatch(r"[a-z]{2,3}(-[a-z0-9]{1,8})*", voice):
        raise ValueError(f"voice must be an espeak-ng voice name such as 'en-us', got {voice!r}")
    if not 80 <= words_per_minute <= 450:
        raise ValueError(f"words_per_minute must be in [80, 450], got {words_per_minute}")
    exe = espeak_ng_path()
    if exe is None:
        raise TextToSpeechError(
            "Text-to-speech needs the espeak-ng program, which is not installed "
            "(Debian/Ubuntu: apt-get install espeak-ng). Please upload or record audio instead."
        )
    wav = Path(out_dir) / f"tts-{uuid.uuid4().hex}.wav"
    try:
        _run_espeak([exe, "-v", voice, "-s", str(words_per_minute), "-w", str(wav), "--stdin"], cleaned, wav)
        samples, rate, _ = read_audio_file(wav)
    finally:
        wav.unlink(missing_ok=True)
    return Speech(samples=samples, sample_rate=rate)


def _run_espeak(cmd: list[str], text: str, wav: Path) -> None:
    try:
        done = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TextToSpeechError("Text-to-speech took too long; please try shorter text.") from None
    if done.returncode != 0 or not wav.is_file():
        raise TextToSpeechError("Text-to-speech failed; please try different text or upload audio.")
