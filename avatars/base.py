"""The small protocol every avatar backend speaks: a request in, an iterator of chunks out.

Each chunk carries typed records of how it was made (the engine's `BlockReport`, the backend's timings); they
become JSON only where a file is written (`ChunkReport.to_dict`, the schema of the CLI's and the app's reports).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ispa import BlockReport


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


@dataclass(frozen=True)
class ChunkTimings:
    """Wall-clock seconds the backend spent on one chunk."""

    model_seconds: float  # denoising the block (every step of the DiT, and the engine's end of block)
    decode_seconds: float  # the VAE decode and the copy of the frames to the host
    decode_hidden_seconds: float = 0.0  # of it, run alongside the next block's DiT (overlap)


@dataclass(frozen=True)
class ChunkReport:
    """How one chunk was made: the engine's report for its block, the backend's timings, and where it ends."""

    engine: BlockReport
    timings: ChunkTimings
    frames: int  # video frames the chunk holds
    end_seconds: float  # where the chunk ends on the speech's clock

    @property
    def num_layers(self) -> int:
        return len(self.engine.kv_bytes_per_layer)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written into report files: the engine's fields plus the backend's, flat."""
        return {
            **self.engine.to_dict(),
            "seconds": self.timings.model_seconds,
            "decode_seconds": self.timings.decode_seconds,
            "decode_hidden_seconds": self.timings.decode_hidden_seconds,
            "num_layers": self.num_layers,
            "frames": self.frames,
            "t_seconds": self.end_seconds,
        }


@dataclass
class AvatarChunk:
    """One generated block: its frames, exactly the audio they play with, and how it was made."""

    index: int
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    audio: np.ndarray  # mono float32, len == round(T / fps * sample_rate)
    sample_rate: int
    fps: float
    report: ChunkReport
