"""Stage 4: the streaming loop of `bench/streaming.py` (Full, then ISPA, one after the other) per variant -
precision (the model's own dtype, or FP8 linears) × eager or compiled regions, with issue 20's levers after a `+`
(`bench/suite/variants.py`: `fp8-compiled+steps3`) - with each block's row recorded as it happens, then the
variant's summary: peak memory during and after warmup, KV and statistics bytes, DiT and decode seconds, decode
hidden by the overlap, FPS after warmup and the ISPA speedup, the last with the decode overlap on
(the default) and off (with it on, a block's decode runs during the next block's DiT and its GPU time lands there).

One pipeline is built and changed in place between variants (converted to FP8 once, regions compiled or not), so
the build is paid once. Variants run in the order given. Each is isolated: its exception (an OOM, an inductor
error, a cuDNN refusal) is recorded as its outcome, its memory freed, and the next variant runs. A variant predicted
to end after the time budget (counted from the suite's start) is skipped with that reason.
`ISPA_SUITE_FAIL_VARIANT=<name>[,<name>]` makes those variants raise at their start (the isolation, tested on a CPU).
"""

from __future__ import annotations

import gc
import math
import os
import time
import traceback
from typing import Any

import torch

from bench.suite.levers import LeverUnavailable, check_available, levers_on
from bench.suite.recorder import Recorder
from bench.suite.scales import Scale
from bench.suite.variants import BASES, OFFICIAL_STEPS, Variant, parse_variant

VARIANTS = BASES  # and any of them with levers: bench/suite/variants.py
DEFAULT_VARIANTS = {"tiny": ("native-eager",), "full": ("native-eager", "fp8-eager", "fp8-compiled")}
FAIL_VARIANT_ENV = "ISPA_SUITE_FAIL_VARIANT"
# Why: a cold inductor compile of the DiT's 5 regions, for Full's and ISPA's shapes, is minutes at 14B (≈ 31 s for 3
# regions of the tiny DiT on 2 CPU cores, docs/performance.md); 3 minutes keeps a compiled variant from starting late.
COMPILE_ESTIMATE_SECONDS = 180.0
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
OVERLAP_OFF_KEYS = ("dit_seconds_median_after_warmup", "decode_seconds_median", "fps_after_warmup")


def check_variants(names: list[str]) -> list[str]:
    for name in names:
        parse_variant(name)
    if len(set(names)) != len(names):
        raise ValueError(f"a streaming variant is listed twice: {names}")
    return names


def predicted_seconds(variant: str, measured: dict[str, float]) -> float | None:
    """How long `variant` should take, from the variants already run (`measured`: name → seconds): an eager variant
    as long as the last eager one (the same precision's if it ran), a compiled one that plus a cold compile, or as
    long as the last compiled run of its precision once one has paid that compile. Levers count as free (they
    only shorten a run, but for a step count: scaled by its steps). None when nothing comparable ran yet (the
    first variant always starts)."""
    wanted = parse_variant(variant)
    runs = [(parse_variant(name), seconds) for name, seconds in measured.items()]
    eager = [seconds for v, seconds in runs if v.mode == "eager"]
    same = [seconds for v, seconds in runs if v.base == f"{wanted.precision}-eager"]
    compiled = [seconds for v, seconds in runs if v.base == wanted.base and v.mode == "compiled"]
    base = same[-1] if same else (eager[-1] if eager else None)
    if wanted.mode == "compiled":
        base = compiled[-1] if compiled else (base or 0.0) + COMPILE_ESTIMATE_SECONDS
    return None if base is None else base * wanted.steps / OFFICIAL_STEPS


def error_line(err: BaseException) -> str:
    """The exception's type and the first line of its message (an OOM message runs to many lines)."""
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0]}" if message else type(err).__name__


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def streaming(
    recorder: Recorder,
    device: torch.device,
    scale: Scale,
    variants: list[str],
    budget_seconds: float | None,
    suite_started: float,
) -> None:
    """Every variant in order; `budget_seconds` counts from `suite_started` (a `time.perf_counter()` reading)."""
    # The wheels a bare CUDA machine may lack (diffusers) are needed from here on only.
    from avatars.liveavatar.compiled import set_compiled_regions
    from avatars.liveavatar.weights.fp8 import convert_linears_to_fp8
    from bench import streaming as bench

    started = time.perf_counter()
    pipe = bench.load(scale.stream_model, fp8=False)
    recorder.record("build_seconds", time.perf_counter() - started)
    recorder.record("dit_parameter_bytes", sum(p.nbytes for p in pipe.dit.parameters()))
    recorder.record("overlap_decode_by_default", device.type == "cuda")  # None: on CUDA only
    request = bench.make_request(scale.stream_model, scale.stream_blocks, seed=0)
    height, width = pipe.output_size(request.portrait, scale.stream_max_area)
    warmup_blocks = math.ceil(scale.stream_t_warm / 3)
    recorder.record("video", {"height": height, "width": width, "blocks": scale.stream_blocks})
    recorder.record("primed_attention_shapes", prime_attention_shapes(pipe, height, width))
    failing = {n.strip() for n in os.environ.get(FAIL_VARIANT_ENV, "").split(",") if n.strip()}
    fp8 = False
    measured: dict[str, float] = {}
    for variant in variants:
        parsed = parse_variant(variant)
        precision, mode = parsed.precision, parsed.mode
        elapsed = time.perf_counter() - suite_started
        predicted = predicted_seconds(variant, measured)
        if budget_seconds is not None and predicted is not None and elapsed + predicted > budget_seconds:
            reason = (
                f"time budget: {elapsed:.0f} s since the suite's start + {predicted:.0f} s predicted"
                f" > {budget_seconds:.0f} s"
            )
            _outcome(recorder, variant, "skipped", reason=reason, predicted_seconds=predicted)
            continue
        if precision == "native" and fp8:
            _outcome(recorder, variant, "skipped", reason="the model is FP8 by now; list it first")
            continue
        try:
            check_available(parsed, torch.cuda.device_count() if device.type == "cuda" else 0)
        except LeverUnavailable as err:
            _outcome(recorder, variant, "skipped", reason=str(err))
            continue
        variant_started = time.perf_counter()
        try:
            if variant in failing:
                raise RuntimeError(
                    f"{FAIL_VARIANT_ENV}={variant}: a failure asked for at the variant's start"
                )
            predicted_bytes = bench.predictions(pipe, height, width, k_fraction=0.5, rings=parsed.steps)
            _memory_model_estimates(recorder, variant, predicted_bytes)
            if precision == "fp8" and not fp8:
                fp8 = (
                    True  # before converting: a conversion that fails half-way leaves no native model either
                )
                convert_linears_to_fp8(pipe.dit)
            set_compiled_regions(pipe, mode == "compiled")
            with levers_on(pipe, request, parsed) as variant_request:
                _run_variant(
                    recorder, bench, pipe, variant_request, variant, warmup_blocks, scale, height, width
                )
        except Exception as err:  # noqa: BLE001 - one variant's failure must not cost the later variants
            seconds = time.perf_counter() - variant_started
            _outcome(recorder, variant, "failed", error=error_line(err), seconds=seconds)
            recorder.append("failed_variants", variant)
            print(traceback.format_exc(), flush=True)
        else:
            measured[variant] = time.perf_counter() - variant_started
            _outcome(recorder, variant, "ok", seconds=measured[variant], predicted_seconds=predicted)
            _compare_compiled(recorder, precision)
            _compare_with_base(recorder, parsed)
        _free(device)  # after the except block, so the exception and its frames' tensors are gone
    set_compiled_regions(pipe, False)
    del pipe
    _free(device)


def _outcome(recorder: Recorder, variant: str, status: str, **details: Any) -> None:
    recorder.record(f"{variant}.outcome", {"status": status, **details})


def _memory_model_estimates(recorder: Recorder, variant: str, predicted: dict[str, int]) -> None:
    basis = "memory model (avatars.liveavatar.memory_plan.terms)"
    recorder.estimate(f"{variant}.full_kv_bytes_after_warmup", predicted["kv_bytes_full"], basis)
    recorder.estimate(f"{variant}.ispa_kv_bytes_after_warmup", predicted["kv_bytes_ispa_after_warmup"], basis)
    recorder.estimate(f"{variant}.ispa_stats_bytes_peak", predicted["stats_bytes"], basis)


def prime_attention_shapes(pipe: Any, height: int, width: int) -> list[list[int]]:
    """One untimed attention call per (Lq, Lk) the loop will see (local, and 1..3 history blocks), so that cuDNN
    builds its plan for each new shape here and not inside the first timed blocks of Full's warmup."""
    from avatars.liveavatar.block_layout import HISTORY_BLOCKS, LATENT_FRAMES_PER_BLOCK
    from ispa import attention_with_lse

    config, device, dtype = pipe.dit.config, pipe.device, pipe.dit.dtype
    latent_h, latent_w = height // 8, width // 8
    block = LATENT_FRAMES_PER_BLOCK * pipe.dit.tokens_per_frame(latent_h, latent_w)
    local = pipe.dit.sink_token_count(latent_h, latent_w) + block
    key_lengths = [local] + [h * block for h in range(1, HISTORY_BLOCKS + 1)]
    q = torch.randn(1, block, config.num_heads, config.head_dim, device=device, dtype=dtype)
    for keys in key_lengths:
        k = torch.randn(1, keys, config.num_heads, config.head_dim, device=device, dtype=dtype)
        attention_with_lse(q, k, k)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [[block, keys] for keys in key_lengths]


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
    """Full and ISPA with the decode overlap as the pipeline sets it (every figure), then both with it off (DiT,
    decode and FPS after warmup, and the ISPA speedup without the decode's GPU time in the DiT's)."""
    default_overlap = pipe.overlap_decode
    try:
        for overlap in ("default", "off"):
            pipe.overlap_decode = default_overlap if overlap == "default" else False
            runs = _run_pair(recorder, bench, pipe, request, variant, warmup_blocks, scale, overlap)
            after_full = runs["full"]["dit_seconds_median_after_warmup"]
            after_ispa = runs["ispa"]["dit_seconds_median_after_warmup"]
            suffix = "" if overlap == "default" else "_overlap_off"
            recorder.record(
                f"{variant}.dit_speedup_after_warmup{suffix}",
                after_full / after_ispa if after_full and after_ispa else None,
            )
            if overlap == "default":
                _warmup_figures(recorder, bench, pipe, variant, runs, height, width)
    finally:
        pipe.overlap_decode = default_overlap


def _run_pair(
    recorder: Recorder,
    bench: Any,
    pipe: Any,
    request: Any,
    variant: str,
    warmup_blocks: int,
    scale: Scale,
    overlap: str,
) -> dict[str, Any]:
    from ispa import FullPolicy, ISPAPolicy

    runs = {}
    for policy_name, policy in (
        ("full", FullPolicy()),
        ("ispa", ISPAPolicy(k_fraction=0.5, t_warm=scale.stream_t_warm)),
    ):
        prefix = policy_name if overlap == "default" else f"overlap_off_{policy_name}"
        key = f"{variant}.{prefix}_blocks"
        print(
            f"  {variant} {policy_name}, decode overlap {overlap}: {scale.stream_blocks} blocks", flush=True
        )
        runs[policy_name] = bench.run_policy(
            pipe,
            request,
            policy,
            scale.stream_blocks,
            warmup_blocks,
            lambda row, key=key, label=policy_name: _block_row(recorder, key, label, row),
            max_area=scale.stream_max_area,
        )
        for name in SUMMARY_KEYS if overlap == "default" else OVERLAP_OFF_KEYS:
            recorder.record(f"{variant}.{prefix}_{name}", runs[policy_name][name])
        if overlap == "default":
            decode = sum(r["decode_seconds"] for r in runs[policy_name]["blocks"][1:])
            hidden = sum(r["decode_hidden_seconds"] for r in runs[policy_name]["blocks"][1:])
            recorder.record(
                f"{variant}.{policy_name}_decode_hidden_share", hidden / decode if decode > 0 else None
            )
    return runs


def _warmup_figures(
    recorder: Recorder, bench: Any, pipe: Any, variant: str, runs: dict[str, Any], height: int, width: int
) -> None:
    full, ispa = runs["full"], runs["ispa"]
    merge_share, statistics_share = bench.warmup_shares(ispa)
    recorder.record(f"{variant}.statistics_share_of_warmup_dit", statistics_share)
    recorder.record(f"{variant}.merge_share_of_warmup_dit", merge_share)
    attention = bench.decomposition_seconds(pipe, height, width)
    layers_steps = pipe.dit.config.num_layers * parse_variant(variant).steps
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


def _compare_with_base(recorder: Recorder, variant: Variant) -> None:
    """A variant with levers, once its base ran too: base / variant ISPA DiT seconds per block after warmup, and
    the FPS after warmup it reaches."""
    if not variant.levers:
        return
    figures = recorder.summary["stages"]["stream"]["figures"]
    base = figures.get(f"{variant.base}.ispa_dit_seconds_median_after_warmup")
    mine = figures.get(f"{variant.name}.ispa_dit_seconds_median_after_warmup")
    recorder.record(f"{variant.name}.dit_speedup_vs_base", base / mine if base and mine else None)
