"""Settings checks: each bad value gets a message naming the field and the values it allows."""

from __future__ import annotations

import math

import pytest

from app.validation import MAX_SEED, ValidationError, validate_settings

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
        (0, "must be a number in (0, 1], got 0."),
        (-1, "must be a number in (0, 1], got -1."),
        (-0.25, "must be a number in (0, 1], got -0.25."),
        (1.5, "must be a number in (0, 1], got 1.5."),
        (math.nan, "must be a number in (0, 1] (a finite number), got nan."),
        ("NaN", "must be a number in (0, 1] (a finite number), got 'NaN'."),
        ("half", "must be a number in (0, 1], got 'half'."),
        (True, "must be a number in (0, 1], got True."),
        (None, "must be a number in (0, 1], got None."),
        ([0.5], "must be a number in (0, 1], got [0.5]."),
    ],
)
def test_bad_k_fraction(value: object, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        settings(k_fraction=value)
    assert str(err.value) == f"The fraction of local layers (k_fraction) {message}"


@pytest.mark.parametrize(
    ("value", "shown"),
    [(0, "0"), (-3, "-3"), (3, "3"), (49, "49"), (12.5, "12.5 (it is not rounded for you)"), ("x", "'x'")],
)
def test_bad_t_warm(value: object, shown: str) -> None:
    """Below two blocks (the policy needs a warmup longer than one) or above 48 frames once rounded up to
    whole blocks (49 -> 51), refused, quoting the value as given."""
    with pytest.raises(ValidationError) as err:
        settings(t_warm=value)
    assert str(err.value) == (
        "The warmup length (T_warm) must be a whole number of latent frames from 6 to 48, "
        f"rounded up to whole 3-frame blocks, got {shown}."
    )


@pytest.mark.parametrize(("given", "used"), [(4, 6), (5, 6), (10, 12), (13, 15), (6, 6), (24, 24), (46, 48)])
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
    with pytest.raises(ValidationError, match="from 8 to 48, rounded up to whole 4-frame blocks, got 4"):
        validate_settings(**GOOD | {"t_warm": 4}, frames_per_block=4)


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
        (-1, "got -1."),
        (MAX_SEED + 1, f"got {MAX_SEED + 1}."),
        (1.5, "got 1.5 (it is not rounded for you)."),
        ("abc", "got 'abc'."),
        (math.nan, "(a finite number), got nan."),
        (True, "got True."),
        (None, "got None."),
    ],
)
def test_bad_seed(value: object, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        settings(seed=value)
    assert str(err.value).startswith(f"The seed must be a whole number from 0 to {MAX_SEED}")
    assert str(err.value).endswith(message)
