"""`python -m avatars.liveavatar.memory_plan`: every GPU memory term of one LiveAvatar run, during warmup and after.

The terms come from `avatars.liveavatar.weights.memory` (weights from the DiT built on `meta`; KV, statistics and
ΔW bytes from the engine's own layout, checked against live tensors in tests/avatars/test_memory_model.py) plus
two transient estimates. The peak of a phase is what stays allocated plus the larger of its transients (a block
forward's activations, or the absorb's solve workspace); it is what `torch.cuda.max_memory_allocated` would see,
without allocator fragmentation. A GPU fits when the peak leaves at least 1.5 GiB for the CUDA context.

    python -m avatars.liveavatar.memory_plan --size 704x384 --weights fp8 --kv fp8 --policy ispa --json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from avatars.liveavatar.block_layout import HISTORY_BLOCKS, LATENT_FRAMES_PER_BLOCK, cache_layout
from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.sizing import planned_size
from avatars.liveavatar.weights import memory
from ispa import ISPAPolicy, statistics_nbytes
from ispa.quantized_cache import KV_FORMATS, quantizes_sink

__all__ = [
    "GPU_SIZES_GB",
    "InsufficientGPUMemoryError",
    "RunPlan",
    "SizeFit",
    "check_fits_free_memory",
    "compare_peak_bytes",
    "lightest_plan",
    "plan_run",
    "sizes_that_fit",
]

GIB = 2**30
CUDA_CONTEXT_BYTES = int(1.5 * GIB)
# What the driver offers on cards sold as N GB: N GiB for the 24/48/80 GB classes; an H200 (141 GB) reports about
# 139 GiB. These are the capacities the plan compares against, not measurements.
GPU_SIZES_GB = (24, 48, 80, 141)
_GPU_CAPACITY_BYTES = {24: 24 * GIB, 48: 48 * GIB, 80: 80 * GIB, 141: 139 * GIB}
# The absorb's solve, per layer, in fp64 (`ispa.absorption._ridge_solve`): G + lam I, its Cholesky factor, C, W,
# C W and the solution (6 D×D fp64), the rebuilt full G and the fp32 result (2 D×D fp32), while one more layer's
# ΔW (D×D fp32) is held before its statistics are freed. An estimate from reading the code, in units of D² bytes.
ABSORB_WORKSPACE_BYTES_PER_DIM2 = 6 * 8 + 2 * 4 + 4
LIGHTEST_KV_FORMAT = "int4"


@dataclass(frozen=True)
class Term:
    """One part of the GPU memory: bytes during warmup and after it, and how the number was obtained."""

    name: str
    warmup: int
    after: int
    basis: str
    transient: bool = False  # allocated only for a moment (a forward, the absorb): the peak takes the largest
    per_model: bool = (
        False  # held once per loaded model, shared by runs that advance side by side (compare mode)
    )


@dataclass(frozen=True)
class RunPlan:
    settings: dict[str, object]
    terms: tuple[Term, ...] = field(default_factory=tuple)

    def _peak(self, phase: str) -> int:
        held = sum(getattr(t, phase) for t in self.terms if not t.transient)
        return held + max((getattr(t, phase) for t in self.terms if t.transient), default=0)

    @property
    def peak_warmup_bytes(self) -> int:
        return self._peak("warmup")

    @property
    def peak_after_bytes(self) -> int:
        return self._peak("after")

    @property
    def peak_bytes(self) -> int:
        return max(self.peak_warmup_bytes, self.peak_after_bytes)

    def fits(self) -> list[int]:
        """The GPU sizes (GB) whose capacity holds the peak plus the CUDA context."""
        return [gb for gb in GPU_SIZES_GB if fits_capacity(self.peak_bytes, _GPU_CAPACITY_BYTES[gb])]


def fits_capacity(peak_bytes: int, capacity_bytes: int) -> bool:
    return peak_bytes + CUDA_CONTEXT_BYTES <= capacity_bytes


def plan_run(
    height: int,
    width: int,
    *,
    weights: str = "fp8",
    kv_format: str = "fp8",
    policy: str = "ispa",
    t_warm: int = 12,
    k_fraction: float = 0.5,
    text_encoder_on_gpu: bool = False,
    model: str = "14b",
) -> RunPlan:
    """Every memory term of one streaming run at `height`×`width`; bad settings raise ValueError naming the field."""
    if weights not in ("bf16", "fp8"):
        raise ValueError(f"weights must be 'bf16' or 'fp8', got {weights!r}")
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format must be one of {', '.join(KV_FORMATS)}, got {kv_format!r}")
    if policy not in ("full", "ispa"):
        raise ValueError(f"policy must be 'full' or 'ispa', got {policy!r}")
    if model not in PRESETS:
        raise ValueError(f"model must be one of {', '.join(PRESETS)}, got {model!r}")
    if height <= 0 or width <= 0 or height % 64 or width % 64:
        raise ValueError(f"size must be positive multiples of 64, got {height}×{width}")
    config = PRESETS[model]
    with torch.device("meta"):
        dit = LiveAvatarDiT.from_config(config)
    latent = (height // 8, width // 8)
    layout = cache_layout(dit.tokens_per_frame(*latent))
    sizes = {
        "num_layers": config.num_layers,
        "dim": config.dim,
        "sink_tokens": dit.sink_token_count(*latent),
        "block_tokens": layout.block_tokens,
        "kv_format": kv_format,
        "heads": config.num_heads,
    }
    dim2 = config.dim * config.dim
    full_kv = memory.kv_cache_bytes(**sizes)
    if policy == "ispa":
        ispa = ISPAPolicy(k_fraction=k_fraction, t_warm=t_warm)
        ispa.check_layout(layout, config.num_layers)
        warm_blocks = math.ceil(t_warm / LATENT_FRAMES_PER_BLOCK)
        held = min(warm_blocks, HISTORY_BLOCKS)  # ring slots are allocated as written
        kv_warm = memory.kv_cache_bytes(**sizes, history_blocks=held)
        kv_after = memory.kv_cache_bytes_after_absorb(**sizes, k_fraction=k_fraction)
        stats = statistics_nbytes(config.num_layers, config.dim)
        local = ispa.num_local_layers(config.num_layers)
        delta = (
            local * 2 * dim2
        )  # ΔW in the projection's activation dtype, bf16 for bf16 and FP8 weights alike
        workspace = ABSORB_WORKSPACE_BYTES_PER_DIM2 * dim2
    else:
        kv_warm = kv_after = full_kv
        stats = delta = workspace = 0
    buffer = memory.dequantized_history_bytes(
        config.dim, layout.block_tokens, kv_format, sizes["sink_tokens"]
    )
    weights_bytes = memory.dit_weight_bytes(dit, fp8=weights == "fp8")
    activations = memory.activation_bytes(config, sizes["sink_tokens"], layout.block_tokens, height, width)
    live = "computed, checked against live tensors"
    terms = (
        Term(
            "DiT weights", weights_bytes, weights_bytes, "computed from the DiT built on meta", per_model=True
        ),
        Term(
            "encoders (VAE, wav2vec2" + (", umT5)" if text_encoder_on_gpu else ")"),
            memory.encoder_bytes(text_encoder_on_gpu),
            memory.encoder_bytes(text_encoder_on_gpu),
            "computed from parameter counts",
            per_model=True,
        ),
        Term(f"KV cache ({_kv_storage(kv_format)})", kv_warm, kv_after, live),
        Term("KV dequantization buffer", buffer, buffer, live),
        Term("ISPA statistics (fp32)", stats, 0, live),
        Term("L-layers' projections with ΔW", 0, delta, live),
        Term("VAE decoder cache", *(memory.VAE_DECODER_CACHE_BYTES_PER_PIXEL * height * width,) * 2, live),
        Term("activations of one block (transient)", activations, activations, "estimate", transient=True),
        Term("absorb solve workspace (transient)", workspace, 0, "estimate", transient=True),
    )
    settings = {
        "model": model,
        "size": f"{height}x{width}",
        "weights": weights,
        "kv_format": kv_format,
        "policy": policy,
        "t_warm": t_warm if policy == "ispa" else None,
        "k_fraction": k_fraction if policy == "ispa" else None,
        "text_encoder_on_gpu": text_encoder_on_gpu,
        "full_bf16_kv_bytes": memory.kv_cache_bytes(**(sizes | {"kv_format": "bf16"})),
    }
    return RunPlan(settings, terms)


def _kv_storage(kv_format: str) -> str:
    sink = kv_format if quantizes_sink(kv_format) else "bf16"
    return f"{kv_format.removesuffix('-all')} history, {sink.removesuffix('-all')} sink"


def compare_peak_bytes(first: RunPlan, second: RunPlan) -> int:
    """Peak of two runs advanced side by side on one model (compare mode): the model's own terms once, both runs'
    held terms, and the larger transient (the runs take turns, so their transients never overlap)."""
    peak = 0
    for phase in ("warmup", "after"):
        shared = sum(getattr(t, phase) for t in first.terms if t.per_model and not t.transient)
        held = sum(
            getattr(t, phase)
            for plan in (first, second)
            for t in plan.terms
            if not (t.per_model or t.transient)
        )
        transient = max(
            (getattr(t, phase) for plan in (first, second) for t in plan.terms if t.transient), default=0
        )
        peak = max(peak, shared + held + transient)
    return peak


class InsufficientGPUMemoryError(RuntimeError):
    """Not even the lightest run fits the GPU; the message gives both numbers."""


def lightest_plan(
    max_area: int, divisor: int, *, weights: str, text_encoder_on_gpu: bool, model: str = "14b"
) -> RunPlan:
    """The least memory any run at this size can take: Full (no statistics) with the smallest KV format."""
    height, width = planned_size(max_area, divisor)
    return plan_run(
        height,
        width,
        weights=weights,
        kv_format=LIGHTEST_KV_FORMAT,
        policy="full",
        text_encoder_on_gpu=text_encoder_on_gpu,
        model=model,
    )


def check_fits_free_memory(plan: RunPlan, free_bytes: int, gpu_name: str) -> None:
    """Raise InsufficientGPUMemoryError unless `plan`'s peak plus the CUDA context fits `free_bytes`."""
    if not fits_capacity(plan.peak_bytes, free_bytes):
        settings = plan.settings
        raise InsufficientGPUMemoryError(
            f"not enough GPU memory on {gpu_name}: even the lightest run ({settings['size']}, "
            f"{settings['weights']} weights, {settings['kv_format']} KV, Full) peaks at "
            f"{plan.peak_bytes / GIB:.2f} GiB + 1.5 GiB for the CUDA context, but only {free_bytes / GIB:.2f} GiB "
            "is free. Try FP8 weights (ISPA_FP8=1 or --fp8), offloading the text encoder, or a larger GPU."
        )


@dataclass(frozen=True)
class SizeFit:
    """Whether one size choice fits a GPU, with the numbers that say why."""

    label: str
    height: int
    width: int
    fits: bool
    peak_bytes: int
    reason: str


def sizes_that_fit(
    gpu_bytes: int,
    sizes: Sequence[tuple[str, int, int]],
    planner: Callable[..., RunPlan] | None = None,
    **settings: object,
) -> list[SizeFit]:
    """For the app's size chooser: each (label, height, width) planned with `settings` (see `plan_run`) against a
    GPU of `gpu_bytes` total memory, leaving 1.5 GiB for the CUDA context. `planner(height, width, **settings)`
    replaces `plan_run` (e.g. the heaviest rank of a pipeline over several GPUs)."""
    if isinstance(gpu_bytes, bool) or not isinstance(gpu_bytes, int) or gpu_bytes <= 0:
        raise ValueError(f"gpu_bytes must be a positive int, got {gpu_bytes!r}")
    result = []
    for label, height, width in sizes:
        plan = (planner or plan_run)(height, width, **settings)
        peak = plan.peak_bytes
        ok = fits_capacity(peak, gpu_bytes)
        verdict = "fits" if ok else "does not fit"
        reason = (
            f"{label}: peak {peak / GIB:.2f} GiB + 1.5 GiB CUDA context {verdict} in {gpu_bytes / GIB:.2f} GiB "
            f"({plan.settings['weights']} weights, {plan.settings['kv_format']} KV, {plan.settings['policy']})"
        )
        result.append(SizeFit(label, height, width, ok, peak, reason))
    return result


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
    parser.add_argument("--policy", choices=("full", "ispa"), default="ispa")
    parser.add_argument("--t-warm", type=int, default=12, help="ISPA warmup in latent frames")
    parser.add_argument("--k-fraction", type=float, default=0.5, help="share of layers ISPA turns local")
    parser.add_argument("--text-encoder-on-gpu", action="store_true", help="keep umT5-XXL on the GPU")
    parser.add_argument("--model", choices=tuple(PRESETS), default="14b")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    return parser


def _row(name: str, warmup: str, after: str, basis: str) -> str:
    return f"{name:<44} {warmup:>12} {after:>12}  {basis}"


def render(plan: RunPlan) -> list[str]:
    """The table: every term in GiB during warmup and after, the peaks, and the GPU sizes it fits."""
    lines = [", ".join(f"{k}={v}" for k, v in plan.settings.items() if k != "full_bf16_kv_bytes")]
    lines.append(_row("term", "warmup GiB", "after GiB", "basis"))
    for term in plan.terms:
        lines.append(_row(term.name, f"{term.warmup / GIB:.3f}", f"{term.after / GIB:.3f}", term.basis))
    lines.append(
        _row("peak", f"{plan.peak_warmup_bytes / GIB:.3f}", f"{plan.peak_after_bytes / GIB:.3f}", "")
    )
    fits = ", ".join(f"{gb} GB" for gb in plan.fits()) or "none of 24/48/80/141 GB"
    lines.append(f"fits (peak + 1.5 GiB CUDA context): {fits}")
    return lines


def to_json(plan: RunPlan) -> dict[str, object]:
    return {
        "settings": plan.settings,
        "terms": {t.name: {"warmup": t.warmup, "after": t.after, "basis": t.basis} for t in plan.terms},
        "peak_warmup_bytes": plan.peak_warmup_bytes,
        "peak_after_bytes": plan.peak_after_bytes,
        "fits": plan.fits(),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_run(
            *args.size,
            weights=args.weights,
            kv_format=args.kv,
            policy=args.policy,
            t_warm=args.t_warm,
            k_fraction=args.k_fraction,
            text_encoder_on_gpu=args.text_encoder_on_gpu,
            model=args.model,
        )
    except ValueError as err:
        print(f"error: {err}", flush=True)
        return 2
    print("\n".join(render(plan)))
    if args.json:
        print(json.dumps(to_json(plan)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
