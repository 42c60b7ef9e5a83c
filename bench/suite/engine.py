"""Stage 3: the engine at the model's shapes - warmup (LSE-decomposed) overhead and L-layer speedup of one layer's
attention, the statistics update in "exact" and "fast" precision, and the absorb of every layer at D, timed and
with the peak memory it adds, queued the way `AttentionSession._absorb` queues it (solve, free, one read-back).
"""

from __future__ import annotations

import math
import time

import torch

from bench.attention import attention_timings, median_seconds, synchronize
from bench.attention import parse_args as attention_args
from bench.suite.recorder import Recorder
from bench.suite.scales import Scale
from ispa import AbsorptionStats, solve_layer

LAMBDA = 1e-3


def attention_paths(recorder: Recorder, device: torch.device, scale: Scale) -> None:
    """bench/attention.py's timings at this scale: one plain call, local + history + merge, local only, merge."""
    args = attention_args(
        [
            f"--device={device}",
            f"--heads={scale.heads}",
            f"--head-dim={scale.head_dim}",
            f"--queries={scale.queries}",
            f"--sink={scale.local_keys - scale.queries}",
            f"--history={scale.history_keys}",
            f"--absorb-dim={scale.dim}",
            f"--repeats={scale.repeats}",
        ]
    )
    seconds = attention_timings(args)
    recorder.record("attention_seconds", seconds)
    recorder.record("warmup_attention_overhead", seconds["local_history_merge"] / seconds["full"] - 1.0)
    recorder.record("l_layer_speedup", seconds["full"] / seconds["local"])


def statistics_update(recorder: Recorder, device: torch.device, scale: Scale) -> None:
    """One layer's update (G's triangle, C, s) in both precisions, and how far "fast" lands from "exact"."""
    gen = torch.Generator(device).manual_seed(2)
    half = torch.bfloat16 if device.type == "cuda" else torch.float32  # activations as the model makes them
    a_loc = torch.randn(scale.queries, scale.dim, device=device, generator=gen).to(half)
    a_full = (a_loc.float() + 0.1 * torch.randn(scale.queries, scale.dim, device=device, generator=gen)).to(
        half
    )
    weight = torch.randn(scale.dim, scale.dim, device=device, generator=gen) / scale.dim**0.5
    stats, seconds = {}, {}
    for precision in ("exact", "fast"):
        stats[precision] = AbsorptionStats(1, scale.dim, device, precision=precision)
        update = stats[precision].update
        seconds[precision] = median_seconds(
            lambda u=update: u(0, a_loc, a_full, weight), device, 1, scale.repeats
        )
        recorder.record(f"statistics_update_{precision}_seconds", seconds[precision])
    exact, fast = stats["exact"], stats["fast"]
    recorder.record(
        "statistics_fast_vs_exact_relative_error",
        {
            "G": float((fast.G(0) - exact.G(0)).norm() / exact.G(0).norm()),
            "C": float((fast.C(0) - exact.C(0)).norm() / exact.C(0).norm()),
        },
    )
    recorder.record("statistics_update_fast_seconds_per_forward", seconds["fast"] * scale.layers)


def absorb(recorder: Recorder, device: torch.device, scale: Scale) -> None:
    """Statistics for `layers` layers at D (one update each), then every solve queued, each layer's statistics freed
    after its solve, and the errors read back once: seconds and the peak memory above what was held before."""
    gen = torch.Generator(device).manual_seed(3)
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    a_loc = torch.randn(scale.queries, scale.dim, device=device, generator=gen).to(half)
    a_full = (a_loc.float() + 0.1 * torch.randn(scale.queries, scale.dim, device=device, generator=gen)).to(
        half
    )
    weight = torch.randn(scale.dim, scale.dim, device=device, generator=gen) / scale.dim**0.5
    stats = AbsorptionStats(scale.layers, scale.dim, device)
    for layer in range(scale.layers):
        stats.update(layer, a_loc, a_full, weight)
    del a_loc, a_full
    recorder.record("statistics_bytes", stats.nbytes())

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)

    def run() -> list[float]:
        deltas, errors = [], []
        for layer in range(scale.layers):
            delta, error = solve_layer(stats.G(layer), stats.C(layer), stats.s(layer), weight, LAMBDA)
            stats.free(layer)
            deltas.append(delta)
            errors.append(error)
        return torch.stack(errors).tolist()  # the single read-back, which also waits for the solves

    synchronize(device)
    started = time.perf_counter()
    errors = run()  # once only: it frees the statistics it solves
    recorder.record("absorb_seconds", time.perf_counter() - started)
    recorder.record("absorb_nonfinite_layers", sum(not math.isfinite(e) for e in errors))
    recorder.record(
        "absorb_extra_peak_bytes", torch.cuda.max_memory_allocated(device) - held if cuda else None
    )
