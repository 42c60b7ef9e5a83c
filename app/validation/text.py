"""Check on text typed for speech synthesis."""

from __future__ import annotations

from app.validation.errors import ValidationError

MAX_TTS_CHARS = 500


def validate_tts_text(text: str | None, *, max_chars: int = MAX_TTS_CHARS) -> str:
    """Text to speak, with whitespace collapsed and control characters dropped."""
    printable = "".join(ch if ch.isprintable() else " " for ch in (text or ""))
    cleaned = " ".join(printable.split())
    if not cleaned:
        raise ValidationError("Please type some text to speak.")
    if len(cleaned) > max_chars:
        raise ValidationError(
            f"The text is {len(cleaned)} characters long; the limit is {max_chars}. Please shorten it."
        )
    return cleaned
