"""`python -m avatars.liveavatar.distributed.memory_per_rank`: the memory plan of each rank of the timestep pipeline.

It starts from the one-GPU plan (`avatars.liveavatar.memory_plan.plan_run`, same terms, same bases) and changes what
the pipeline changes: a DiT rank holds the sink and only its 4/N steps' rings, and the ISPA statistics and ΔW of
every layer (all its steps' forwards run through every layer); only the decoder rank keeps the VAE decoder cache.
As loaded today, every rank holds the DiT weights and the encoders (the loader builds the whole pipeline on each).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from avatars.liveavatar.block_layout import (
    DENOISING_STEPS,
    cache_layout,
)
from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.distributed.layout import RankLayout
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.memory_plan import GIB, RunPlan, _size, plan_run
from avatars.liveavatar.weights import memory
from ispa import KV_FORMATS

__all__ = ["plan_ranks"]

_KV_TERM = "KV cache"
_DECODER_TERM = "VAE decoder cache"


def plan_ranks(height: int, width: int, layout: RankLayout, **plan_options) -> dict[str, RunPlan]:
    """One plan per role: 'DiT rank' (each holds the same), and 'decoder rank' when it has its own rank."""
    one_gpu = plan_run(height, width, **plan_options)
    config = PRESETS[plan_options.get("model", "14b")]
    with torch.device("meta"):
        dit = LiveAvatarDiT.from_config(config)
    latent = (height // 8, width // 8)
    sink = memory.kv_cache_bytes(
        config.num_layers,
        config.dim,
        dit.sink_token_count(*latent),
        cache_layout(dit.tokens_per_frame(*latent)).block_tokens,
        rings=0,
    )
    share = (DENOISING_STEPS // layout.dit_ranks) / DENOISING_STEPS

    def dit_term(term):
        if term.name.startswith(_KV_TERM):
            return replace(
                term,
                warmup=sink + round(share * (term.warmup - sink)),
                after=sink + round(share * (term.after - sink)),
                basis=f"one-GPU term: sink + {DENOISING_STEPS // layout.dit_ranks} of {DENOISING_STEPS} rings",
            )
        if term.name == _DECODER_TERM and not layout.decoder_shared:
            return replace(term, warmup=0, after=0, basis="on the decoder rank")
        return term

    plans = {"DiT rank": RunPlan(one_gpu.settings, tuple(map(dit_term, one_gpu.terms)))}
    if not layout.decoder_shared:
        keep = ("DiT weights", "encoders", _DECODER_TERM)
        decoder_terms = tuple(
            t if t.name.startswith(keep) else replace(t, warmup=0, after=0, basis="on the DiT ranks")
            for t in one_gpu.terms
        )
        plans["decoder rank"] = RunPlan(one_gpu.settings, decoder_terms)
    return plans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avatars.liveavatar.distributed.memory_per_rank")
    parser.add_argument("--processes", type=int, default=5, help="torchrun --nproc-per-node (2, 3, 4 or 5)")
    parser.add_argument("--decoder-on-last-dit", action="store_true")
    parser.add_argument("--size", type=_size, default=(704, 384), help="HEIGHTxWIDTH of the video")
    parser.add_argument("--weights", choices=("bf16", "fp8"), default="fp8")
    parser.add_argument("--kv", choices=KV_FORMATS, default="fp8", help="KV history storage")
    parser.add_argument("--policy", choices=("full", "ispa"), default="ispa")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    layout = RankLayout.for_world(args.processes, args.decoder_on_last_dit)
    plans = plan_ranks(*args.size, layout, weights=args.weights, kv_format=args.kv, policy=args.policy)
    summary = {}
    for role, plan in plans.items():
        warm, after = plan.peak_warmup_bytes, plan.peak_after_bytes
        summary[role] = {"warmup_gib": round(warm / GIB, 3), "after_gib": round(after / GIB, 3)}
        print(f"{role} ({layout.dit_ranks} DiT ranks, decoder on rank {layout.decoder_rank})")
        for t in plan.terms:
            print(f"  {t.name:<44} {t.warmup / GIB:8.3f} {t.after / GIB:8.3f}  {t.basis}")
        print(f"  {'peak':<44} {warm / GIB:8.3f} {after / GIB:8.3f}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
