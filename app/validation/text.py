"""Checks on typed text (the prompt, and text to speak): what reaches the tokenizer or espeak-ng is clean text.

Invisible and control characters (NUL, other C0/C1 controls, right-to-left and other bidi marks, zero-width
characters, private-use and unassigned code points) are removed with a note; emoji and other pictographs are
removed from text to speak (espeak-ng has nothing to say for them) and kept in the prompt. A lone UTF-16
surrogate cannot be encoded at all (a client sent broken text), so it is refused with its position.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

from app.validation.errors import ValidationError

MAX_TTS_CHARS = 500
MAX_PROMPT_CHARS = 500
INVISIBLE_CATEGORIES = (
    "Cc",
    "Cf",
    "Co",
    "Cn",
)  # controls, format (bidi, zero-width), private use, unassigned
PICTOGRAPH_CATEGORIES = ("So", "Sk")  # emoji and other symbols, skin-tone modifiers
SURROGATES = range(0xD800, 0xE000)


@dataclass(frozen=True)
class CleanText:
    text: str
    warnings: list[str] = field(default_factory=list)


def clean_text(value: Any, *, label: str, max_chars: int, drop_pictographs: bool = False) -> CleanText:
    """`value` as text fit for the tokenizer or espeak-ng: Unicode NFC, whitespace collapsed, invisible
    characters removed (with a note); `label` names the field in every message."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValidationError(f"{label} must be text (a string), got {type(value).__name__}.")
    for position, ch in enumerate(value):
        if ord(ch) in SURROGATES:
            raise ValidationError(
                f"{label} contains a broken character (a lone UTF-16 surrogate, U+{ord(ch):04X}) at position "
                f"{position + 1}; please retype or paste the text again."
            )
    normal = unicodedata.normalize("NFC", value)
    kept, invisible, pictographs = [], 0, 0
    for ch in normal:
        category = unicodedata.category(ch)
        if ch.isspace():
            kept.append(" ")
        elif category in INVISIBLE_CATEGORIES:
            invisible += 1
            kept.append(" " if category == "Cc" else "")
        elif drop_pictographs and category in PICTOGRAPH_CATEGORIES:
            pictographs += 1
            kept.append(" ")
        else:
            kept.append(ch)
    text = " ".join("".join(kept).split())
    if len(text) > max_chars:
        raise ValidationError(
            f"{label} is {len(text)} characters long; the limit is {max_chars}. Please shorten it."
        )
    notes = []
    if invisible:
        notes.append(
            f"{label}: {invisible} control or invisible character(s) (such as NUL, or right-to-left marks) "
            "were removed."
        )
    if pictographs:
        notes.append(f"{label}: {pictographs} emoji or symbol(s) cannot be spoken and were left out.")
    return CleanText(text=text, warnings=notes)


def validate_tts_text(text: Any, *, max_chars: int = MAX_TTS_CHARS) -> CleanText:
    """Text to speak, cleaned; refused when nothing speakable is left."""
    cleaned = clean_text(text, label="The text to speak", max_chars=max_chars, drop_pictographs=True)
    if not any(ch.isalnum() for ch in cleaned.text):
        raise ValidationError(
            "Please type some text to speak (letters or digits; emoji alone cannot be spoken)."
        )
    return cleaned


def validate_prompt(prompt: Any, *, max_chars: int = MAX_PROMPT_CHARS) -> CleanText:
    """The optional prompt, cleaned (empty is allowed)."""
    return clean_text(prompt, label="The prompt", max_chars=max_chars)
