"""Argument checks shared by the engine and the models built on it (a bool is never a number here)."""

from __future__ import annotations

from typing import Any


def is_int(value: Any) -> bool:
    """An int that is not a bool (True is an int to Python, never a count or an index to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_positive_int(value: Any, name: str) -> int:
    """`value` if it is a positive int; ValueError naming `name` otherwise."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
