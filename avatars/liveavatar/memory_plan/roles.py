"""The roles a GPU has in a LiveAvatar run: the whole pipeline on one GPU, or one rank's stage of the timestep
pipeline (`avatars.liveavatar.rank_layout`). Ranks of one role hold the same terms, so a plan per role is a
plan per GPU.
"""

from __future__ import annotations

import enum

from avatars.liveavatar.block_layout import DENOISING_STEPS
from avatars.liveavatar.rank_layout import RankLayout

__all__ = ["DECODING", "DENOISING", "ENCODING", "Role", "role_of_rank", "roles_of", "rings_per_dit_rank"]


class Role(enum.Enum):
    """What one GPU runs; the value is its label in printed plans."""

    ONE_GPU = "one GPU"
    LEAD = "rank 0 (DiT rank 0, the encoders)"  # reads and encodes every request, denoises its steps
    DIT = "DiT rank"  # denoises its steps only
    DECODING_DIT = "last DiT rank (decodes too)"
    DECODER = "decoder rank"  # decodes only


DENOISING = frozenset({Role.ONE_GPU, Role.LEAD, Role.DIT, Role.DECODING_DIT})  # hold the DiT
DECODING = frozenset({Role.ONE_GPU, Role.DECODING_DIT, Role.DECODER})  # hold the VAE and its decoder cache
ENCODING = frozenset({Role.ONE_GPU, Role.LEAD})  # hold every encoder (the VAE encodes the portrait there)


def role_of_rank(layout: RankLayout | None, rank: int = 0) -> Role:
    """The role of `rank` in `layout`; `Role.ONE_GPU` without a layout. Rank 0 never decodes (`RankLayout`)."""
    if layout is None:
        return Role.ONE_GPU
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank {rank} is not in a pipeline of {layout.world_size} processes")
    if rank == 0:
        return Role.LEAD
    if rank >= layout.dit_ranks:
        return Role.DECODER
    return Role.DECODING_DIT if rank == layout.decoder_rank else Role.DIT


def roles_of(layout: RankLayout | None) -> list[Role]:
    """The roles `layout` has, in rank order; [ONE_GPU] without a layout."""
    if layout is None:
        return [Role.ONE_GPU]
    return list(dict.fromkeys(role_of_rank(layout, rank) for rank in range(layout.world_size)))


def rings_per_dit_rank(layout: RankLayout | None) -> int:
    """History rings (= denoising steps) one DiT rank owns: all of them on one GPU."""
    return DENOISING_STEPS if layout is None else DENOISING_STEPS // layout.dit_ranks
