"""The small protocol every avatar backend speaks: a request in, an iterator of chunks out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class GenerationRequest:
    """What a backend needs to stream a talking head.

    `audio` is either a whole mono float32 waveform at `sample_rate`, or an iterable of such pieces
    that arrive over time (live microphone mode); a backend consumes it as it arrives.
    """

    portrait: np.ndarray  # [H, W, 3] uint8 RGB
    audio: np.ndarray | Iterable[np.ndarray]
    sample_rate: int
    prompt: str = ""
    seed: int = 0
    width: int | None = None  # output size; None = the backend's default for the portrait
    height: int | None = None


@dataclass
class AvatarChunk:
    """One generated block: its frames, exactly the audio they play with, and the engine's report."""

    index: int
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    audio: np.ndarray  # mono float32, len == round(T / fps * sample_rate)
    sample_rate: int
    fps: float
    report: dict[str, Any] = field(default_factory=dict)  # ispa BlockReport.to_dict() + backend timings
