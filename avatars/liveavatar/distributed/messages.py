"""What travels between the ranks (pickled; every tensor on the CPU).

Every message names its run (`run`, a number rank 0 hands out): the ranks may hold several runs at once (compare
mode's Full and ISPA streams take turns on the same pipeline), and a receiver takes the message of the run it
works on, keeping the others' for later (`PeerChannel.recv_run`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avatars.liveavatar.dit.audio_encoder import AudioTokens
from ispa import BlockReport, Policy

__all__ = ["BlockWork", "DecodedBlock", "Reference", "RunSpec", "StageReport"]


@dataclass
class RunSpec:
    """Down the pipeline at the start of a run, ahead of its blocks: what each rank needs to build its part."""

    run: int
    policy: Policy
    kv_format: str
    refresh_sink: bool
    seed: int
    context_states: torch.Tensor  # TextContext.states of the prompt [1, text_len, dim]
    ref_latent: torch.Tensor  # [1, C, 1, h, w]
    motion_latents: torch.Tensor  # [1, C, T, h, w]
    latent_h: int
    latent_w: int


@dataclass
class BlockWork:
    """A block on its way down the pipeline; `latents` None means the run ends here (finished or cancelled)."""

    run: int
    block: int
    latents: torch.Tensor | None = None  # [1, C, 3, h, w], denoised up to the sender's last step
    audio: AudioTokens | None = None
    recalibrate: bool = False  # rank 0 took a recalibration request before this block
    mass_sums: list[torch.Tensor | None] | None = None  # this block's history-share sums so far, per layer
    mass_counts: list[int] | None = None


@dataclass
class StageReport:
    """A DiT rank's part of a block's report: its session's report, its sink's bytes per layer, its time."""

    run: int
    block: int
    engine: BlockReport
    sink_bytes: list[int]
    seconds: float


@dataclass
class DecodedBlock:
    """The decoder's output for one block; `frames` None marks the end of the run."""

    run: int
    block: int
    frames: np.ndarray | None = None  # [12, H, W, 3] uint8
    decode_seconds: float = 0.0


@dataclass
class Reference:
    """Last DiT rank → the others: block 0's first latent frame, for the sink refresh at clip 1."""

    run: int
    latent: torch.Tensor  # [1, C, 1, h, w]
