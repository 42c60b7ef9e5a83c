"""`python -m avatars.liveavatar.distributed.memory_per_rank`: print the memory plan of each rank (`rank_memory`)."""

from __future__ import annotations

import argparse
import json

from avatars.liveavatar.distributed.layout import RankLayout
from avatars.liveavatar.distributed.rank_memory import plan_ranks
from avatars.liveavatar.memory_plan import GIB, _size
from ispa import KV_FORMATS


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
