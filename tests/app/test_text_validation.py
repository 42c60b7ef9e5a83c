"""Typed text (the prompt, text to speak): what reaches the tokenizer or espeak-ng is clean, printable text, and
what cannot be cleaned is refused with a message naming the field."""

from __future__ import annotations

import unicodedata

import pytest

from app.validation import ValidationError, validate_prompt, validate_tts_text

RTL_MARKS = "\u200f\u202e\u2066"  # right-to-left mark, right-to-left override, left-to-right isolate


def test_tts_text_is_cleaned_and_limited() -> None:
    cleaned = validate_tts_text("  Hello,\n\tworld!\x00  ")
    assert cleaned.text == "Hello, world!"
    assert cleaned.warnings == [
        "The text to speak: 1 control or invisible character(s) (such as NUL, or right-to-left marks) were removed."
    ]
    assert validate_tts_text("a" * 500).text == "a" * 500
    with pytest.raises(ValidationError) as err:
        validate_tts_text("a" * 501)
    assert str(err.value) == "The text to speak is 501 characters long; the limit is 500. Please shorten it."
    with pytest.raises(ValidationError, match="limit is 10"):
        validate_tts_text("eleven char", max_chars=10)
    for empty in (None, "", " \n\t ", "\x00\x07", "😀🎉"):
        with pytest.raises(ValidationError, match="Please type some text to speak"):
            validate_tts_text(empty)


@pytest.mark.parametrize("check", [validate_prompt, validate_tts_text])
def test_control_bidi_and_zero_width_characters_are_removed(check) -> None:
    raw = f"a\x00b\x1bc{RTL_MARKS}d\u200be\ufeff f\x85g"
    cleaned = check(raw)
    assert cleaned.text == "a b cde f g"
    assert all(unicodedata.category(ch)[0] != "C" for ch in cleaned.text)
    cleaned.text.encode("utf-8")  # every character can be encoded
    assert "7 control or invisible character(s)" in cleaned.warnings[0]


@pytest.mark.parametrize(
    ("check", "label"), [(validate_prompt, "The prompt"), (validate_tts_text, "The text to speak")]
)
def test_a_lone_surrogate_is_refused_with_its_position(check, label: str) -> None:
    with pytest.raises(ValidationError) as err:
        check("ab\ud800c")
    assert str(err.value) == (
        f"{label} contains a broken character (a lone UTF-16 surrogate, U+D800) at position 3; "
        "please retype or paste the text again."
    )


def test_emoji_stay_in_the_prompt_but_are_not_spoken() -> None:
    assert validate_prompt("a person smiles 😀").text == "a person smiles 😀"
    spoken = validate_tts_text("hello 😀 there 👍🏽")
    assert spoken.text == "hello there"
    assert spoken.warnings == ["The text to speak: 3 emoji or symbol(s) cannot be spoken and were left out."]


def test_text_is_normalised_and_must_be_a_string() -> None:
    assert validate_prompt("cafe\u0301").text == "caf\u00e9"  # NFC: one code point, as the tokenizer expects
    assert validate_prompt(None).text == ""
    with pytest.raises(ValidationError, match="The prompt must be text \\(a string\\), got int."):
        validate_prompt(5)
    with pytest.raises(ValidationError, match="The prompt is 501 characters long; the limit is 500."):
        validate_prompt("x" * 501)
