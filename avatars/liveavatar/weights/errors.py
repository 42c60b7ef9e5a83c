"""The one error raised for weights that are missing, incomplete or not what they claim to be."""

from __future__ import annotations

from collections.abc import Sequence

SHOWN_NAMES = 10  # how many offending names an error message lists


class CheckpointError(ValueError):
    """A checkpoint folder or file cannot be used; the message names the files or keys at fault."""


def listing(names: Sequence[str]) -> str:
    """The first few names, and how many there are in all when some are left out."""
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f" … ({len(names)} in all)" if len(names) > SHOWN_NAMES else "")
