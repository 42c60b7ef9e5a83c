"""Benchmark of ISPA's attention paths and absorb step.

Measures, for one layer's self-attention at LiveAvatar's shapes (40 heads x 128, a 3,168-token block attending to a
2,640-token sink, itself and 9,504 history tokens):
  (a) full attention in one call vs local + history + LSE merge  -> the warmup overhead (ratio),
  (b) local-only attention vs full                                  -> the L-layer speedup (ratio),
  (c) one layer's absorb step at D = 5,120 (`solve_layer`: Cholesky solve, delta and eps) -> seconds,
  plus one streaming statistics update (what every warmup forward adds).

On CUDA it runs at full size in bf16. On CPU it defaults to --scale 0.125 (token counts and D scaled) in fp32 so it
finishes in well under a minute on two cores. Run from the repository root:

    python bench/attention.py [--json] [--scale S] [--device cuda] [--backend torch_cuda] ...

Prints a table; with --json the last line is one JSON object (device, shapes, seconds, ratios).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/attention.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ispa import AbsorptionStats, attention_with_lse, merge_attention, solve_layer

LIVEAVATAR = {
    "heads": 40,
    "head_dim": 128,
    "queries": 3168,
    "sink": 2640,
    "history": 9504,
    "absorb_dim": 5120,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--scale", type=float, default=None, help="token counts and D times this (CPU default 0.125)"
    )
    parser.add_argument("--heads", type=int, default=LIVEAVATAR["heads"])
    parser.add_argument("--head-dim", type=int, default=LIVEAVATAR["head_dim"])
    for name in ("queries", "sink", "history", "absorb_dim"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {LIVEAVATAR[name]} x scale"
        )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--backend", default=None, help="attention backend (default: best available)")
    parser.add_argument("--lam", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before measuring")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" else 0.125)
    if scale <= 0:
        parser.error("--scale must be positive")
    for name in ("queries", "sink", "history", "absorb_dim"):
        if getattr(args, name) is None:
            setattr(args, name, max(1, round(LIVEAVATAR[name] * scale)))
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.device = device
    args.scale = scale
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `fn`, timed with CUDA events on GPU and perf_counter on CPU, after warmup runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def attention_timings(args: argparse.Namespace) -> dict[str, float]:
    device, dtype = args.device, DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(0)

    def tokens(n: int) -> torch.Tensor:
        return torch.randn(1, n, args.heads, args.head_dim, generator=gen, device=device, dtype=dtype)

    q = tokens(args.queries)
    local_k, local_v = tokens(args.sink + args.queries), tokens(args.sink + args.queries)
    hist_k, hist_v = tokens(args.history), tokens(args.history)
    all_k, all_v = torch.cat([local_k, hist_k], 1), torch.cat([local_v, hist_v], 1)
    local = attention_with_lse(q, local_k, local_v, backend=args.backend)
    history = attention_with_lse(q, hist_k, hist_v, backend=args.backend)

    def decomposed() -> None:
        a = attention_with_lse(q, local_k, local_v, backend=args.backend)
        b = attention_with_lse(q, hist_k, hist_v, backend=args.backend)
        merge_attention(*a, *b)

    timed = {
        "full": lambda: attention_with_lse(q, all_k, all_v, backend=args.backend),
        "local_history_merge": decomposed,
        "local": lambda: attention_with_lse(q, local_k, local_v, backend=args.backend),
        "merge": lambda: merge_attention(*local, *history),
    }
    return {name: median_seconds(fn, device, args.warmup, args.repeats) for name, fn in timed.items()}


def absorb_timings(args: argparse.Namespace) -> dict[str, float]:
    device, dim = args.device, args.absorb_dim
    gen = torch.Generator(device=device).manual_seed(1)
    a_loc = torch.randn(args.queries, dim, generator=gen, device=device)
    a_full = a_loc + 0.1 * torch.randn(args.queries, dim, generator=gen, device=device)
    weight = torch.randn(dim, dim, generator=gen, device=device) / dim**0.5
    stats = AbsorptionStats(1, dim, device)
    stats.update(0, a_loc, a_full, weight)

    def absorb_step() -> None:  # what the session runs per layer at the absorb
        solve_layer(stats.G(0), stats.C(0), stats.s(0), weight, args.lam)

    return {
        "absorb_step": median_seconds(absorb_step, device, args.warmup, args.repeats),
        "stats_update": median_seconds(
            lambda: stats.update(0, a_loc, a_full, weight), device, args.warmup, args.repeats
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    seconds = attention_timings(args) | absorb_timings(args)
    result = {
        "device": device_name(args.device),
        "backend": args.backend or "auto",
        "dtype": args.dtype,
        "scale": args.scale,
        "shapes": {
            "heads": args.heads,
            "head_dim": args.head_dim,
            "queries": args.queries,
            "local_keys": args.sink + args.queries,
            "history_keys": args.history,
            "full_keys": args.sink + args.queries + args.history,
            "absorb_dim": args.absorb_dim,
        },
        "seconds": seconds,
        "ratios": {
            "warmup_overhead": seconds["local_history_merge"] / seconds["full"],
            "local_speedup": seconds["full"] / seconds["local"],
            "merge_share_of_decomposed": seconds["merge"] / seconds["local_history_merge"],
        },
    }
    print_table(result)
    if args.json:
        print(json.dumps(result))
    return result


def print_table(result: dict) -> None:
    shapes = result["shapes"]
    print(
        f"device: {result['device']}  dtype: {result['dtype']}  backend: {result['backend']}  scale: {result['scale']}"
    )
    print(
        f"{shapes['heads']} heads x {shapes['head_dim']}, {shapes['queries']} queries; keys: local {shapes['local_keys']}, "
        f"history {shapes['history_keys']}, full {shapes['full_keys']}; absorb D = {shapes['absorb_dim']}"
    )
    rows = [
        ("(a) full attention, one call", "full"),
        ("(a) local + history + merge", "local_history_merge"),
        ("    of which LSE merge", "merge"),
        ("(b) local only (L-layer)", "local"),
        ("(c) absorb step (solve + eps)", "absorb_step"),
        ("    statistics update / forward", "stats_update"),
    ]
    print(f"{'measurement':<34}{'median ms':>12}")
    for label, key in rows:
        print(f"{label:<34}{result['seconds'][key] * 1000:>12.3f}")
    ratios = result["ratios"]
    print(
        f"warmup overhead (a): {ratios['warmup_overhead']:.3f}x   L-layer speedup (b): {ratios['local_speedup']:.3f}x"
    )


if __name__ == "__main__":
    main()
