"""`python -m avatars.liveavatar.memory_plan`: every GPU memory term of one LiveAvatar run, during warmup and after,
on one GPU or (with `--ranks K`) on each role's GPU of the timestep pipeline of K processes.

    python -m avatars.liveavatar.memory_plan --size 704x384 --weights fp8 --kv fp8 --policy ispa --json
    python -m avatars.liveavatar.memory_plan --ranks 5 --json
"""

from __future__ import annotations

import argparse
import json

from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.memory_plan.plan import plan_roles
from avatars.liveavatar.memory_plan.roles import Role
from avatars.liveavatar.rank_layout import RankLayout
from avatars.memory import GIB, GPU_CARDS, MemoryPlan
from ispa import KV_FORMATS, POLICIES, Policy, make_policy

__all__ = ["build_parser", "main", "render", "to_json"]


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--size must be HEIGHTxWIDTH, e.g. 704x384, got {text!r}") from err
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m avatars.liveavatar.memory_plan",
        description="GPU memory of one LiveAvatar streaming run, term by term, during warmup and after it.",
    )
    parser.add_argument("--size", type=_size, default=(704, 384), help="HEIGHTxWIDTH of the video")
    parser.add_argument("--weights", choices=("bf16", "fp8"), default="fp8")
    parser.add_argument("--kv", choices=KV_FORMATS, default="fp8", help="KV history storage")
    parser.add_argument("--policy", choices=tuple(POLICIES), default="ispa")
    parser.add_argument("--t-warm", type=int, default=12, help="ISPA warmup in latent frames")
    parser.add_argument("--k-fraction", type=float, default=0.5, help="share of layers ISPA turns local")
    parser.add_argument("--text-encoder-on-gpu", action="store_true", help="keep umT5-XXL on the GPU")
    parser.add_argument(
        "--audio-fp32", action="store_true", help="wav2vec2 in fp32 instead of the official bf16"
    )
    parser.add_argument("--model", choices=tuple(PRESETS), default="14b")
    parser.add_argument(
        "--ranks",
        type=int,
        default=None,
        metavar="K",
        help="plan each role of the pipeline of K processes (torchrun --nproc-per-node: 2, 3, 4 or 5)",
    )
    parser.add_argument(
        "--decoder-on-last-dit", action="store_true", help="with --ranks: the last DiT rank decodes too"
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    return parser


def _row(name: str, warmup: str, after: str, basis: str) -> str:
    return f"{name:<44} {warmup:>12} {after:>12}  {basis}"


def render(plan: MemoryPlan) -> list[str]:
    """The table: every term in GiB during warmup and after, the peaks, and the GPU sizes it fits."""
    lines = [", ".join(f"{k}={v}" for k, v in plan.settings.items() if k != "full_bf16_kv_bytes")]
    lines.append(_row("term", "warmup GiB", "after GiB", "basis"))
    for term in plan.terms:
        lines.append(_row(term.name, f"{term.warmup / GIB:.3f}", f"{term.after / GIB:.3f}", term.basis))
    lines.append(
        _row("peak", f"{plan.peak_warmup_bytes / GIB:.3f}", f"{plan.peak_after_bytes / GIB:.3f}", "")
    )
    fits = ", ".join(plan.fits()) or "none of " + ", ".join(card.name for card in GPU_CARDS)
    lines.append(f"fits (peak + 1.5 GiB CUDA context, as each card reports its memory): {fits}")
    return lines


def to_json(plan: MemoryPlan) -> dict[str, object]:
    """The command's JSON contract for one GPU: settings, terms by label, peaks, and the GPU sizes that fit."""
    return {
        "settings": plan.settings,
        "terms": {t.name: {"warmup": t.warmup, "after": t.after, "basis": t.basis} for t in plan.terms},
        "peak_warmup_bytes": plan.peak_warmup_bytes,
        "peak_after_bytes": plan.peak_after_bytes,
        "fits": plan.fits(),
    }


def _policy(args: argparse.Namespace) -> Policy:
    return make_policy(args.policy, k_fraction=args.k_fraction, t_warm=args.t_warm)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        layout = None if args.ranks is None else RankLayout.for_world(args.ranks, args.decoder_on_last_dit)
        if layout is None and args.decoder_on_last_dit:
            raise ValueError("--decoder-on-last-dit needs --ranks")
        plans = plan_roles(
            *args.size,
            model=args.model,
            weights=args.weights,
            kv_format=args.kv,
            policy=_policy(args),
            layout=layout,
            text_encoder_on_gpu=args.text_encoder_on_gpu,
            audio_fp32=args.audio_fp32,
        )
    except ValueError as err:
        print(f"error: {err}", flush=True)
        return 2
    if layout is None:
        plan = plans[Role.ONE_GPU]
        print("\n".join(render(plan)))
        if args.json:
            print(json.dumps(to_json(plan)))
        return 0
    for role, plan in plans.items():
        print(f"{role.value} ({layout.dit_ranks} DiT ranks, decoder on rank {layout.decoder_rank})")
        print("\n".join("  " + line for line in render(plan)))
    if args.json:
        summary = {
            "processes": layout.world_size,
            "dit_ranks": layout.dit_ranks,
            "decoder_rank": layout.decoder_rank,
            "roles": {role.value: to_json(plan) for role, plan in plans.items()},
        }
        print(json.dumps(summary))
    return 0
