"""The small protocol every avatar backend speaks: a request in, an iterator of chunks out (`AvatarBackend`).

Each chunk carries typed records of how it was made (the engine's `BlockReport`, the backend's timings); they
become JSON only where a file is written (`ChunkReport.to_dict`, the schema of the CLI's and the app's reports).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from ispa import BlockReport, FullPolicy, Policy

if TYPE_CHECKING:
    from avatars.memory import MemoryPlan


@dataclass
class GenerationRequest:
    """What a backend needs to stream a talking head, and how.

    `audio` is either a whole mono float32 waveform at `sample_rate`, or an iterable of such pieces
    that arrive over time (live microphone mode); a backend consumes it as it arrives.
    """

    portrait: np.ndarray  # [H, W, 3] uint8 RGB
    audio: np.ndarray | Iterable[np.ndarray]
    sample_rate: int
    prompt: str = ""
    seed: int = 0
    policy: Policy = field(default_factory=FullPolicy)  # the KV-cache policy of the run
    max_area: int | None = None  # the size choice (pixel budget); None: the backend's first choice
    kv_format: str = "bf16"  # how the KV history is stored: one of `ispa.KV_FORMATS`
    refresh_sink: bool = False  # prefill the sink again at clip 1 (LiveAvatar's 5-GPU behaviour)
    steps: int = 4  # denoising steps; fewer than the model's official count is a deviation, for speed


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


class BackendFailure(RuntimeError):
    """The backend broke in a way the user cannot fix (e.g. a rank of a pipeline died). Its message is for the
    server log; the app shows the user its own words."""


class RunControl:
    """Flags the app flips while a run streams; the run reads them between blocks. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recalibrate = False
        self._cancelled = False

    def request_recalibration(self) -> None:
        with self._lock:
            self._recalibrate = True

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True

    @property
    def cancelled(self) -> bool:
        with self._lock:
            return self._cancelled

    def take_recalibration(self) -> bool:
        """True once per request."""
        with self._lock:
            requested, self._recalibrate = self._recalibrate, False
            return requested


@runtime_checkable
class AvatarBackend(Protocol):
    """What the app needs of a loaded model, on one process or over a pipeline of ranks.

    The app never names a concrete backend class: it reads these attributes and calls these methods only.
    """

    label: str  # for the status line and the banner
    is_test_model: bool  # an untrained test model: the app says its video is noise
    sample_rate: int  # of the speech `stream()` takes
    fps: float  # of the video it makes

    @property
    def device(self) -> torch.device:
        """Where the runs' tensors live (the app hands chunks off this device)."""
        ...

    def size_choices(self) -> list[tuple[str, int]]:
        """(label, max pixel area) for a size dropdown; the first is the default."""
        ...

    def output_size(self, portrait: np.ndarray, max_area: int | None = None) -> tuple[int, int]:
        """(height, width) of the video made from this portrait under `max_area` (default: the first choice)."""
        ...

    def planned_size(self, max_area: int) -> tuple[int, int]:
        """(height, width) a size choice is planned at before any portrait is seen."""
        ...

    def memory_plans(self, height: int, width: int, policy: Policy, kv_format: str) -> list[MemoryPlan]:
        """The GPU memory plan of one run at `height`×`width`: one plan per kind of GPU the backend uses (one
        for a single GPU; one per rank role for a pipeline of ranks)."""
        ...

    def stream(self, request: GenerationRequest, control: RunControl | None = None) -> Iterator[AvatarChunk]:
        """Generate chunk by chunk. Bad input raises ValueError (naming the field) before anything runs; a broken
        backend raises `BackendFailure`. Closing the generator or `control.cancel()` ends the run."""
        ...

    def close(self) -> None:
        """Release what the backend holds (for a pipeline of ranks: tell the other ranks to stop)."""
        ...
