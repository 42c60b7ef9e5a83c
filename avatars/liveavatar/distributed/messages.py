"""The pipeline's own control records, beside the run's (`avatars.liveavatar.streaming.messages`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KeepAlive"]


@dataclass(frozen=True)
class KeepAlive:
    """Down the pipeline while the lead has sent nothing else for a while: it is alive (followers wait for work
    at most the group's timeout between two messages, so a hung lead is noticed)."""
