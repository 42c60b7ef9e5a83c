"""The one error raised for weights that are missing, incomplete or not what they claim to be."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint folder or file cannot be used; the message names the files or keys at fault."""
