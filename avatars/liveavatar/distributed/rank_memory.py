"""The memory plan of each rank of the timestep pipeline (printed by `python -m
avatars.liveavatar.distributed.memory_per_rank`).

It starts from the one-GPU plan (`avatars.liveavatar.memory_plan.plan_run`, same terms, same bases) and keeps of
each term what a rank holds (`stage_models`): a DiT rank holds the DiT, the sink and only its 4/N steps' rings,
and the ISPA statistics and ΔW of every layer (all its steps' forwards run through every layer); rank 0 alone holds
the encoders (it reads and encodes every request); the rank that decodes holds the VAE and its decoder cache.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from avatars.liveavatar.block_layout import DENOISING_STEPS, cache_layout
from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.distributed.layout import RankLayout
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.memory_plan import LIGHTEST_KV_FORMAT, RunPlan, Term, plan_run
from avatars.liveavatar.sizing import LIVEAVATAR_SIZES, SIZE_DIVISOR, planned_size
from avatars.liveavatar.weights import memory

__all__ = ["plan_ranks", "rank_lightest_plan", "role_of_rank"]

LEAD = "rank 0 (DiT rank 0, the encoders)"
DIT = "DiT rank"
DECODING_DIT = "last DiT rank (decodes too)"
DECODER = "decoder rank"


def role_of_rank(layout: RankLayout, rank: int) -> str:
    """Which of the plan's roles `rank` has (ranks of one role hold the same)."""
    if rank == 0:
        return LEAD
    if rank >= layout.dit_ranks:
        return DECODER
    return DECODING_DIT if rank == layout.decoder_rank else DIT


def plan_ranks(height: int, width: int, layout: RankLayout, **plan_options) -> dict[str, RunPlan]:
    """One plan per role the layout has, in rank order (`role_of_rank`)."""
    one_gpu = plan_run(height, width, **plan_options)
    config = PRESETS[plan_options.get("model", "14b")]
    with torch.device("meta"):
        dit = LiveAvatarDiT.from_config(config)
    latent = (height // 8, width // 8)
    block_tokens = cache_layout(dit.tokens_per_frame(*latent)).block_tokens
    sink_tokens = dit.sink_token_count(*latent)
    sink = memory.kv_cache_bytes(
        config.num_layers,
        config.dim,
        sink_tokens,
        block_tokens,
        rings=0,
        kv_format=one_gpu.settings["kv_format"],
        heads=config.num_heads,
    )
    rings = DENOISING_STEPS // layout.dit_ranks
    dit_activations = memory.dit_activation_bytes(config, sink_tokens, block_tokens)
    vae_activations = memory.vae_decode_activation_bytes(height, width)

    def held(term: Term, rank: int) -> Term:
        on_dit, decodes = rank < layout.dit_ranks, rank == layout.decoder_rank
        if term.name == "DiT weights" or term.name.startswith(
            ("KV dequantization", "ISPA", "L-layers", "absorb")
        ):
            return term if on_dit else _none(term, "on the DiT ranks")
        if term.name.startswith("encoders"):
            if rank == 0:
                return term
            if decodes:
                vae = memory.vae_weight_bytes()
                return replace(term, name="VAE weights", warmup=vae, after=vae)
            return _none(term, "on rank 0")
        if term.name.startswith("KV cache"):
            if not on_dit:
                return _none(term, "on the DiT ranks")
            basis = f"one-GPU term: sink + {rings} of {DENOISING_STEPS} rings"
            share = rings / DENOISING_STEPS
            return replace(
                term,
                warmup=sink + round(share * (term.warmup - sink)),
                after=sink + round(share * (term.after - sink)),
                basis=basis,
            )
        if term.name == "VAE decoder cache":
            return term if decodes else _none(term, "on the decoder rank")
        if term.name.startswith("activations"):
            size = (dit_activations if on_dit else 0) + (vae_activations if decodes else 0)
            parts = " + ".join(
                part for part, here in (("DiT block", on_dit), ("VAE decode", decodes)) if here
            )
            return replace(term, warmup=size, after=size, basis=f"estimate: {parts}")
        raise ValueError(f"the per-rank plan does not know the term {term.name!r}")

    plans: dict[str, RunPlan] = {}
    for rank in range(layout.world_size):
        role = role_of_rank(layout, rank)
        if role not in plans:
            plans[role] = RunPlan(one_gpu.settings, tuple(held(term, rank) for term in one_gpu.terms))
    return plans


def rank_lightest_plan(layout: RankLayout, rank: int, *, weights: str, model: str = "14b") -> RunPlan:
    """The least memory `rank` can need: its role's plan of Full with the lightest KV at the smallest size."""
    smallest = min(size.max_area for size in LIVEAVATAR_SIZES)
    height, width = planned_size(smallest, SIZE_DIVISOR)
    plans = plan_ranks(
        height, width, layout, weights=weights, kv_format=LIGHTEST_KV_FORMAT, policy="full", model=model
    )
    return plans[role_of_rank(layout, rank)]


def _none(term: Term, where: str) -> Term:
    return replace(term, warmup=0, after=0, basis=where)
