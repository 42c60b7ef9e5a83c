"""What one stage of a run hands to the next: the same records whether the next stage is in this process or on
another rank (where `avatars.liveavatar.distributed.channel` sends their tensors as tensors and the rest pickled).

Every record names its run (`run`, a number the lead hands out): a process may hold several runs at once (compare
mode's Full and ISPA streams take turns on the same models), and a receiver takes the records of the run it works on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avatars.liveavatar.dit.audio_encoder import AudioTokens
from ispa import BlockReport, Policy

__all__ = ["BlockWork", "DecodedBlock", "Reference", "RunSpec", "StageReport"]


@dataclass
class RunSpec:
    """What every stage needs to build its part of a run, handed out before the run's first block."""

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
    steps: int = 4  # denoising steps (avatars.liveavatar.schedule.STEP_CHOICES); 4 is the official schedule
    statistics_precision: str | None = None  # ispa.statistics_precision; None: the device's default
    fused_merge: bool = False  # the sessions' LSE merge compiled (ispa.fused_merge)


@dataclass
class BlockWork:
    """A block on its way through the stages; `latents` None marks the end of the run (finished or cancelled)."""

    run: int
    block: int
    latents: torch.Tensor | None = None  # [1, C, 3, h, w], denoised up to the sender's last step
    audio: AudioTokens | None = None
    recalibrate: bool = False  # the lead took a recalibration request in this block
    mass_sums: list[torch.Tensor | None] | None = None  # this block's history-share sums so far, per layer
    mass_counts: list[int] | None = None


@dataclass
class StageReport:
    """One stage's part of a block's report: its session's report, its sink's bytes per layer, its seconds."""

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
    frames: torch.Tensor | None = None  # [12, H, W, 3] uint8
    decode_seconds: float = 0.0


@dataclass
class Reference:
    """The stage of the last step → the others: block 0's first latent frame, for the sink refresh at clip 1."""

    run: int
    latent: torch.Tensor  # [1, C, 1, h, w]
