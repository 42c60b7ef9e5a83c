"""Stage 4: the streaming loop of `bench/streaming.py` (Full, then ISPA, one after the other) per variant -
precision (the model's own dtype, or FP8 linears) × eager or compiled regions - with each block's row recorded as it
happens, then the variant's summary: peak memory during and after warmup, KV and statistics bytes, DiT and decode
seconds, decode hidden by the overlap, FPS after warmup and the ISPA speedup.

One pipeline is built and changed in place between variants (converted to FP8 once, regions compiled or not), so
the build is paid once; variants run in the order given and stop at the time budget.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import torch

from bench.suite.recorder import Recorder
from bench.suite.scales import Scale

VARIANTS = ("native-eager", "native-compiled", "fp8-eager", "fp8-compiled")
DEFAULT_VARIANTS = {"tiny": ("native-eager",), "full": ("native-eager", "fp8-eager", "fp8-compiled")}
SUMMARY_KEYS = (
    "peak_allocated_warmup_bytes",
    "peak_allocated_after_warmup_bytes",
    "kv_bytes_peak",
    "kv_bytes_after_warmup",
    "stats_bytes_peak",
    "dit_seconds_median_warmup",
    "dit_seconds_median_after_warmup",
    "decode_seconds_median",
    "fps",
    "fps_after_warmup",
)


def check_variants(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown streaming variants {unknown}; choose from {', '.join(VARIANTS)}")
    return names


def streaming(
    recorder: Recorder, device: torch.device, scale: Scale, variants: list[str], budget_seconds: float | None
) -> None:
    # The wheels a bare CUDA machine may lack (diffusers) are needed from here on only.
    from avatars.liveavatar.compiled import set_compiled_regions
    from avatars.liveavatar.weights.fp8 import convert_linears_to_fp8
    from bench import streaming as bench

    started = time.perf_counter()
    pipe = bench.load(scale.stream_model, fp8=False)
    recorder.record("build_seconds", time.perf_counter() - started)
    recorder.record("dit_parameter_bytes", sum(p.nbytes for p in pipe.dit.parameters()))
    request = bench.make_request(scale.stream_model, scale.stream_blocks, seed=0)
    height, width = pipe.output_size(request.portrait, scale.stream_max_area)
    warmup_blocks = math.ceil(scale.stream_t_warm / 3)
    recorder.record("video", {"height": height, "width": width, "blocks": scale.stream_blocks})
    fp8 = False
    last_variant_seconds = 0.0
    for variant in variants:
        precision, mode = variant.split("-")
        elapsed = time.perf_counter() - started
        if budget_seconds is not None and elapsed + last_variant_seconds > budget_seconds:
            recorder.append(
                "skipped_variants", {"variant": variant, "reason": f"time budget ({elapsed:.0f} s used)"}
            )
            continue
        variant_started = time.perf_counter()
        if precision == "fp8" and not fp8:
            convert_linears_to_fp8(pipe.dit)
            fp8 = True
        elif precision == "native" and fp8:
            recorder.append(
                "skipped_variants", {"variant": variant, "reason": "the model is FP8 by now; list it first"}
            )
            continue
        set_compiled_regions(pipe, mode == "compiled")
        _run_variant(recorder, bench, pipe, request, variant, warmup_blocks, scale, height, width)
        last_variant_seconds = time.perf_counter() - variant_started
        _compare_compiled(recorder, precision)
    set_compiled_regions(pipe, False)
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_variant(
    recorder: Recorder,
    bench: Any,
    pipe: Any,
    request: Any,
    variant: str,
    warmup_blocks: int,
    scale: Scale,
    height: int,
    width: int,
) -> None:
    from ispa import FullPolicy, ISPAPolicy

    runs = {}
    for policy_name, policy in (
        ("full", FullPolicy()),
        ("ispa", ISPAPolicy(k_fraction=0.5, t_warm=scale.stream_t_warm)),
    ):
        key = f"{variant}.{policy_name}_blocks"
        print(f"  {variant} {policy_name}: {scale.stream_blocks} blocks", flush=True)
        runs[policy_name] = bench.run_policy(
            pipe,
            request,
            policy,
            scale.stream_blocks,
            warmup_blocks,
            lambda row, key=key, label=policy_name: _block_row(recorder, key, label, row),
            max_area=scale.stream_max_area,
        )
        for name in SUMMARY_KEYS:
            recorder.record(f"{variant}.{policy_name}_{name}", runs[policy_name][name])
        decode = sum(r["decode_seconds"] for r in runs[policy_name]["blocks"][1:])
        hidden = sum(r["decode_hidden_seconds"] for r in runs[policy_name]["blocks"][1:])
        recorder.record(
            f"{variant}.{policy_name}_decode_hidden_share", hidden / decode if decode > 0 else None
        )
    full, ispa = runs["full"], runs["ispa"]
    after_full, after_ispa = full["dit_seconds_median_after_warmup"], ispa["dit_seconds_median_after_warmup"]
    recorder.record(
        f"{variant}.dit_speedup_after_warmup", after_full / after_ispa if after_full and after_ispa else None
    )
    merge_share, statistics_share = bench.warmup_shares(ispa)
    recorder.record(f"{variant}.statistics_share_of_warmup_dit", statistics_share)
    recorder.record(f"{variant}.merge_share_of_warmup_dit", merge_share)
    attention = bench.decomposition_seconds(pipe, height, width)
    layers_steps = pipe.dit.config.num_layers * 4
    extra = (attention["decomposed_seconds"] - attention["plain_seconds"]) * layers_steps
    recorder.record(f"{variant}.decomposition_overhead_per_block", extra / full["dit_seconds_median"])
    recorder.record(f"{variant}.absorb_seconds", ispa["absorb_seconds"])


def _block_row(recorder: Recorder, key: str, policy: str, row: dict[str, Any]) -> None:
    recorder.append(key, row)
    print(
        f"    {policy:<4} block {row['index']:>2} {row['phase']:<9} DiT {row['dit_seconds']:.3f} s"
        f"  decode {row['decode_seconds']:.3f} s (hidden {row['decode_hidden_seconds']:.3f})"
        f"  KV {row['kv_bytes'] / 1e6:.2f} MB",
        flush=True,
    )


def _compare_compiled(recorder: Recorder, precision: str) -> None:
    """Once both modes of a precision ran: eager / compiled median DiT seconds of ISPA's blocks after warmup."""
    figures = recorder.summary["stages"]["stream"]["figures"]
    eager = figures.get(f"{precision}-eager.ispa_dit_seconds_median_after_warmup")
    compiled = figures.get(f"{precision}-compiled.ispa_dit_seconds_median_after_warmup")
    key = f"{precision}.compiled_vs_eager_dit_speedup"
    if eager and compiled and key not in figures:
        recorder.record(key, eager / compiled)
