"""Settings and text-to-speak checks: each bad value gets its own message."""

from __future__ import annotations

import math

import pytest

from app.validation import MAX_SEED, ValidationError, validate_settings, validate_tts_text

GOOD = {"k_fraction": 0.5, "t_warm": 12, "lam": 1e-3, "seed": 0}


def settings(**changes: object):
    return validate_settings(**(GOOD | changes))


def test_good_settings_pass_unchanged() -> None:
    s = settings()
    assert (s.k_fraction, s.t_warm, s.lam, s.seed, s.warnings) == (0.5, 12, 1e-3, 0, [])


def test_gradio_number_and_textbox_values_are_accepted() -> None:
    s = settings(k_fraction="1", t_warm=6.0, lam="0.01", seed=42.0)
    assert (s.k_fraction, s.t_warm, s.lam, s.seed) == (1.0, 6, 0.01, 42)
    assert isinstance(s.t_warm, int) and isinstance(s.seed, int)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be in (0, 1], got 0"),
        (-0.25, "must be in (0, 1], got -0.25"),
        (1.5, "must be in (0, 1], got 1.5"),
        (math.nan, "k_fraction) must be a finite number"),
        ("half", "k_fraction) must be a number"),
        (True, "k_fraction) must be a number"),
        (None, "k_fraction) must be a number"),
    ],
)
def test_bad_k_fraction(value: object, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        settings(k_fraction=value)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "at least 1 latent frame, got 0"),
        (-3, "got -3"),
        (12.5, "T_warm) must be a whole number, got 12.5"),
    ],
)
def test_bad_t_warm(value: object, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        settings(t_warm=value)
    assert message in str(err.value)


@pytest.mark.parametrize(("given", "used"), [(1, 3), (10, 12), (13, 15), (3, 3), (24, 24)])
def test_t_warm_is_rounded_up_to_whole_blocks(given: int, used: int) -> None:
    s = settings(t_warm=given)
    assert s.t_warm == used
    if given == used:
        assert s.warnings == []
    else:
        assert s.warnings == [
            f"T_warm = {given} latent frames is not a whole number of 3-frame blocks; using {used}."
        ]


def test_block_length_is_configurable() -> None:
    assert validate_settings(**GOOD | {"t_warm": 5}, frames_per_block=4).t_warm == 8
    assert validate_settings(**GOOD | {"t_warm": 5}, frames_per_block=1).warnings == []


@pytest.mark.parametrize(
    ("value", "message"),
    [(0, "greater than 0, got 0"), (-1e-3, "greater than 0, got -0.001"), (math.inf, "finite number")],
)
def test_bad_lambda(value: float, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        settings(lam=value)
    assert "regulariser (λ)" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, f"between 0 and {MAX_SEED}, got -1"),
        (MAX_SEED + 1, f"got {MAX_SEED + 1}"),
        (1.5, "seed must be a whole number, got 1.5"),
        ("lucky", "seed must be a number"),
    ],
)
def test_bad_seed(value: object, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        settings(seed=value)
    assert message in str(err.value)


def test_tts_text_is_cleaned_and_limited() -> None:
    assert validate_tts_text("  Hello,\n\tworld!\x00  ") == "Hello, world!"
    assert validate_tts_text("a" * 500) == "a" * 500
    with pytest.raises(ValidationError) as err:
        validate_tts_text("a" * 501)
    assert str(err.value) == "The text is 501 characters long; the limit is 500. Please shorten it."
    with pytest.raises(ValidationError, match="limit is 10"):
        validate_tts_text("eleven char", max_chars=10)
    for empty in (None, "", " \n\t "):
        with pytest.raises(ValidationError, match="Please type some text"):
            validate_tts_text(empty)
