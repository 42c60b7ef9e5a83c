"""Every KV policy on the same inputs and seed: its KV bytes and its drift from Full (PSNR / SSIM per chunk).

    python bench/policies.py --seconds 4 --json                 # the tiny model (CPU, a few minutes)
    python bench/policies.py --real-dims --seconds 4 --json     # LiveAvatar-14B's shapes, random weights (CUDA)

Each policy runs the fashion-blogger example (portrait, the first `--seconds` of its speech, seed 1) with
k_fraction 0.5 and `--t-warm` (default 6, so the transition comes at the end of block 1), through the pipeline's
own `stream`. Per policy it prints:
- budget: what the policy keeps after the transition (ISPA / Evict: the history of N − K layers; Window /
  Salience: (N − K) / N of every layer's ring, in tokens);
- kv_after: KV bytes held at the last block (counted from the live tensors), and as a share of ISPA's;
- drift from Full over the chunks after the transition: mean and lowest PSNR (dB), mean SSIM.
Then the memory plan's KV bytes at the real model's 704x384 for every policy (computed; the plan is checked
against live tensors at the tiny sizes in the tests).

`--real-dims` builds `bench.random_pipeline.LIVEAVATAR_14B` on a CUDA device: the real shapes with RANDOM weights.
Its KV bytes are the real run's; its drift says nothing about quality, because random weights make random video.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/policies.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import soundfile as sf

from bench.app_requests import EXAMPLES

POLICY_NAMES = ("full", "ispa", "evict", "window", "salience")
K_FRACTION = 0.5


def run_policy(pipe: Any, request: Any, name: str, t_warm: int) -> dict[str, Any]:
    """One run under policy `name`: its chunks' frames and engine reports."""
    from ispa import make_policy

    policy = make_policy(name, k_fraction=K_FRACTION, t_warm=t_warm)
    frames, reports = [], []
    for chunk in pipe.stream(dataclasses.replace(request, policy=policy)):
        frames.append(chunk.frames)
        reports.append(chunk.report.engine)
    return {"policy": policy, "frames": frames, "reports": reports}


def budget_text(name: str, policy: Any, num_layers: int) -> str:
    from ispa import BudgetedPolicy, ISPAPolicy

    if isinstance(policy, BudgetedPolicy):
        return f"{policy.kept_share(num_layers):.3f} of every layer's ring (by bytes)"
    if isinstance(policy, ISPAPolicy):
        local = policy.num_local_layers(num_layers)
        return f"rings of {num_layers - local} of {num_layers} layers" + (
            "" if policy.applies_delta else ", ΔW=0"
        )
    return "every ring"


def drift_after(full: dict[str, Any], run: dict[str, Any], first_chunk: int) -> dict[str, float | None]:
    """PSNR (dB) and SSIM against Full's chunks from `first_chunk` on (the chunks after the transition)."""
    from app.metrics import chunk_drift

    drifts = [
        chunk_drift(index, a, b)
        for index, (a, b) in enumerate(zip(full["frames"], run["frames"], strict=True))
        if index >= first_chunk
    ]
    if not drifts:
        return {"psnr_mean_db": None, "psnr_min_db": None, "ssim_mean": None}
    finite = [d.psnr_db for d in drifts if math.isfinite(d.psnr_db)]
    return {
        "psnr_mean_db": float(np.mean(finite)) if finite else math.inf,
        "psnr_min_db": min(d.psnr_db for d in drifts),
        "ssim_mean": float(np.mean([d.ssim for d in drifts])),
    }


def planned_kv_at_14b(t_warm: int) -> dict[str, dict[str, int]]:
    """The memory plan's KV bytes (bf16 KV) of every policy at 704x384 on the real 14B model, during warmup and
    after."""
    from avatars.liveavatar.memory_plan import plan_terms
    from avatars.memory import TermKind
    from ispa import make_policy

    planned = {}
    for name in POLICY_NAMES:
        policy = make_policy(name, k_fraction=K_FRACTION, t_warm=max(t_warm, 12))
        plan = plan_terms(704, 384, model="14b", weights="bf16", kv_format="bf16", policy=policy)
        kv = next(term for term in plan.terms if term.kind == TermKind.KV_CACHE)
        planned[name] = {"warmup": kv.warmup, "after": kv.after}
    return planned


def build(real_dims: bool) -> Any:
    if not real_dims:
        from avatars.liveavatar.loading import build_tiny_pipeline

        return build_tiny_pipeline()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "--real-dims needs a CUDA GPU (the 14B-shaped DiT alone takes 33 GB); none is visible"
        )
    from bench.random_pipeline import LIVEAVATAR_14B, build_random_pipeline

    return build_random_pipeline(LIVEAVATAR_14B, "cuda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of the example's speech")
    parser.add_argument("--t-warm", type=int, default=6, help="warmup in latent frames (3 per block)")
    parser.add_argument(
        "--real-dims", action="store_true", help="LiveAvatar-14B's shapes, random weights (CUDA)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from avatars.base import GenerationRequest
    from avatars.media.portrait import read_portrait

    pipe = build(args.real_dims)
    audio, rate = sf.read(EXAMPLES / "fashion_blogger.wav", dtype="float32")
    request = GenerationRequest(
        portrait=read_portrait(EXAMPLES / "fashion_blogger.jpg").image,
        audio=audio[: round(args.seconds * rate)],
        sample_rate=rate,
        seed=1,
    )
    runs = {name: run_policy(pipe, request, name, args.t_warm) for name in POLICY_NAMES}
    num_layers = len(runs["full"]["reports"][0].kv_bytes_per_layer)
    transition = next((r.index for r in runs["ispa"]["reports"] if r.event), None)
    first_after = len(runs["full"]["frames"]) if transition is None else transition + 1
    ispa_after = runs["ispa"]["reports"][-1].kv_bytes
    label = pipe.label + (" — RANDOM WEIGHTS: drift says nothing of quality" if args.real_dims else "")
    rows = {}
    for name, run in runs.items():
        last = run["reports"][-1]
        rows[name] = {
            "budget": budget_text(name, run["policy"], num_layers),
            "kv_bytes_after": last.kv_bytes,
            "kv_vs_ispa": last.kv_bytes / ispa_after,
            "kv_bytes_full_ring": last.kv_bytes_full_ring,
            **drift_after(runs["full"], run, first_after),
        }
    planned = planned_kv_at_14b(args.t_warm)

    print(f"model: {label}; {len(runs['full']['frames'])} chunks; transition after chunk {transition}")
    print(
        f"{'policy':<9} {'KV after (MB)':>13} {'vs ISPA':>8} {'PSNR mean':>10} {'PSNR min':>9} {'SSIM':>6}  budget"
    )
    for name, row in rows.items():
        psnr_mean = "-" if row["psnr_mean_db"] is None else f"{row['psnr_mean_db']:.2f}"
        psnr_min = "-" if row["psnr_min_db"] is None else f"{row['psnr_min_db']:.2f}"
        ssim = "-" if row["ssim_mean"] is None else f"{row['ssim_mean']:.4f}"
        print(
            f"{name:<9} {row['kv_bytes_after'] / 1e6:>13.3f} {row['kv_vs_ispa']:>8.3f} {psnr_mean:>10} "
            f"{psnr_min:>9} {ssim:>6}  {row['budget']}"
        )
    print(
        "memory plan, 14B at 704x384, bf16 KV, k_fraction 0.5 (computed, GB): "
        + ", ".join(f"{name} {kv['after'] / 1e9:.2f}" for name, kv in planned.items())
    )
    if args.json:
        print(
            json.dumps(
                {"model": label, "transition_chunk": transition, "policies": rows, "planned_kv_14b": planned}
            )
        )


if __name__ == "__main__":
    main()
