"""What each rank of the pipeline holds: rank 0 the whole pipeline (it reads and encodes every request); every
other rank only its stage's models: the DiT on a DiT rank, the VAE where the decode runs.

A rank other than 0 therefore loads no wav2vec2 and no umT5, and the decoder rank no DiT
(`avatars.liveavatar.loading.load_parts`); its GPU is checked against its own role's lightest plan before any
weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.encoders.vae import WanVAE
from avatars.liveavatar.loading import load_parts
from avatars.liveavatar.memory_plan import check_fits_free_memory, lightest_plan, role_of_rank
from avatars.liveavatar.pipeline import LiveAvatarPipeline
from avatars.liveavatar.rank_layout import RankLayout

__all__ = ["StageModels", "load_stage_models"]


@dataclass
class StageModels:
    """The models one rank's stages run; `dit` None on the decoder's own rank, `vae` None where nothing decodes."""

    device: torch.device
    dit: LiveAvatarDiT | None
    vae: WanVAE | None

    @classmethod
    def of_pipeline(cls, pipeline: LiveAvatarPipeline) -> StageModels:
        return cls(pipeline.device, pipeline.dit, pipeline.vae)


def load_stage_models(name: str, layout: RankLayout, rank: int, *, fp8: bool) -> StageModels:
    """The models of `rank` (not 0: rank 0 loads the whole pipeline), on this process's GPU; the tiny model's on
    the CPU."""
    if rank == 0:
        raise ValueError("rank 0 loads the whole pipeline (load_pipeline), not a stage's models")
    on_gpu = name != "tiny" and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    holds_dit, holds_vae = rank < layout.dit_ranks, rank == layout.decoder_rank
    if on_gpu:
        plan = lightest_plan(weights="fp8" if fp8 else "bf16", layout=layout, rank=rank)
        free, _ = torch.cuda.mem_get_info(device)
        check_fits_free_memory(
            plan, free, f"{torch.cuda.get_device_name(device)} ({role_of_rank(layout, rank).value})"
        )
    dit, vae = load_parts(name, fp8=fp8, device=device, dit=holds_dit, vae=holds_vae)
    return StageModels(device, dit, vae)
