"""Which of a model's sizes fit this machine's GPU, and whether one run's settings do, by the memory plan.

The size dropdown offers LiveAvatar 14B the sizes whose lightest run (Full with int4 KV history, the DiT weights as
loaded) fits the detected GPU with room for the CUDA context; a size is an area bound, planned at what it gives a
16:9 portrait (704×384 for the official area). When a run is asked for, its own settings are planned at the
portrait's own size (the KV format, the policy's statistics and ΔW, and in compare mode both runs' caches), and a
run that would not fit is refused before anything is allocated, with the formats that would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from app.inputs import RunSpec
from app.validation import ValidationError
from avatars.liveavatar.memory_plan import (
    CUDA_CONTEXT_BYTES,
    GIB,
    LIGHTEST_KV_FORMAT,
    RunPlan,
    compare_peak_bytes,
    fits_capacity,
    plan_run,
    sizes_that_fit,
)
from avatars.liveavatar.pipeline import LiveAvatarPipeline
from avatars.liveavatar.sizing import planned_size
from ispa import KV_FORMATS, ISPAPolicy


def cuda_total_bytes() -> int | None:
    """Total memory of the first CUDA GPU, or None without one."""
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def sizes_for_gpu(
    sizes: Sequence[tuple[str, int]],
    divisor: int,
    *,
    fp8_weights: bool,
    gpu_bytes: Callable[[], int | None] = cuda_total_bytes,
) -> tuple[list[tuple[str, int]], list[str]]:
    """(the sizes whose lightest run fits, a reason for each that does not); every size without a GPU to plan for."""
    total = gpu_bytes()
    if total is None:
        return list(sizes), []
    planned = [(label, *planned_size(area, divisor)) for label, area in sizes]
    weights = "fp8" if fp8_weights else "bf16"
    fits = sizes_that_fit(total, planned, weights=weights, kv_format=LIGHTEST_KV_FORMAT, policy="full")
    kept = [size for size, fit in zip(sizes, fits, strict=True) if fit.fits]
    return kept, [fit.reason for fit in fits if not fit.fits]


def check_run_fits(
    spec: RunSpec,
    pipe: LiveAvatarPipeline,
    *,
    fp8_weights: bool,
    gpu_bytes: Callable[[], int | None] = cuda_total_bytes,
) -> None:
    """Refuse, in our words, a run whose planned peak (plus the CUDA context) exceeds the GPU; nothing without one."""
    total = gpu_bytes()
    if total is None:
        return
    height, width = pipe.output_size(spec.portrait, spec.max_area)
    peak = _peak(spec, height, width, spec.kv_format, fp8_weights)
    if fits_capacity(peak, total):
        return
    lighter = [f for f in KV_FORMATS if fits_capacity(_peak(spec, height, width, f, fp8_weights), total)]
    advice = (
        f"it fits with the KV-cache format {' or '.join(lighter)}"
        if lighter
        else "no KV-cache format makes it fit: choose ISPA alone or a smaller size"
    )
    raise ValidationError(
        f"This run does not fit the GPU: {spec.mode} at {height}×{width} with {spec.kv_format} KV peaks at "
        f"{peak / GIB:.2f} GiB by the memory plan, plus {CUDA_CONTEXT_BYTES / GIB:.1f} GiB for the CUDA context, "
        f"and the GPU has {total / GIB:.2f} GiB; {advice}."
    )


def _peak(spec: RunSpec, height: int, width: int, kv_format: str, fp8_weights: bool) -> int:
    plans: list[RunPlan] = [
        plan_run(
            height,
            width,
            weights="fp8" if fp8_weights else "bf16",
            kv_format=kv_format,
            policy="ispa" if isinstance(policy, ISPAPolicy) else "full",
            t_warm=spec.settings.t_warm,
            k_fraction=spec.settings.k_fraction,
        )
        for _, policy in spec.policies()
    ]
    return plans[0].peak_bytes if len(plans) == 1 else compare_peak_bytes(*plans)
