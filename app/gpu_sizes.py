"""Which of a model's sizes fit this machine's GPU, and whether one run's settings do, by the memory plan.

The size dropdown offers LiveAvatar 14B the sizes whose lightest run (Full with int4 KV history, the DiT weights as
loaded) fits the detected GPU with room for the CUDA context; a size is an area bound, planned at what it gives a
16:9 portrait (704×384 for the official area). When a run is asked for, its own settings are planned at the
portrait's own size (the KV format, the policy's statistics and ΔW, and in compare mode both runs' caches), and a
run that would not fit is refused before anything is allocated, with the formats that would.

On a pipeline of ranks (the app under torchrun) each GPU holds one rank's share (`rank_memory.plan_ranks`): the
heaviest rank is planned, every GPU taken as large as rank 0's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from app.inputs import RunSpec
from app.validation import ValidationError
from avatars.liveavatar.distributed import PipelineLead
from avatars.liveavatar.distributed.rank_memory import plan_ranks
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


# (height, width, **plan_run's settings) -> the plan of each kind of GPU the run uses
GPUPlanner = Callable[..., list[RunPlan]]


def gpu_planner(pipe: LiveAvatarPipeline | PipelineLead) -> GPUPlanner:
    """One plan for a pipeline on one GPU; one per rank role for a pipeline of ranks."""
    if isinstance(pipe, PipelineLead):
        layout = pipe.world.layout
        return lambda height, width, **settings: list(plan_ranks(height, width, layout, **settings).values())
    return _one_gpu


def sizes_for_gpu(
    sizes: Sequence[tuple[str, int]],
    divisor: int,
    *,
    fp8_weights: bool,
    planner: GPUPlanner | None = None,
    gpu_bytes: Callable[[], int | None] = cuda_total_bytes,
) -> tuple[list[tuple[str, int]], list[str]]:
    """(the sizes whose lightest run fits, a reason for each that does not); every size without a GPU to plan for.
    `planner`: `gpu_planner` of the pipeline (one GPU when not given)."""
    total = gpu_bytes()
    if total is None:
        return list(sizes), []
    plans = planner or _one_gpu
    planned = [(label, *planned_size(area, divisor)) for label, area in sizes]
    weights = "fp8" if fp8_weights else "bf16"
    fits = sizes_that_fit(
        total,
        planned,
        lambda h, w, **settings: max(plans(h, w, **settings), key=lambda plan: plan.peak_bytes),
        weights=weights,
        kv_format=LIGHTEST_KV_FORMAT,
        policy="full",
    )
    kept = [size for size, fit in zip(sizes, fits, strict=True) if fit.fits]
    return kept, [fit.reason for fit in fits if not fit.fits]


def check_run_fits(
    spec: RunSpec,
    pipe: LiveAvatarPipeline | PipelineLead,
    *,
    fp8_weights: bool,
    gpu_bytes: Callable[[], int | None] = cuda_total_bytes,
) -> None:
    """Refuse, in our words, a run whose planned peak (plus the CUDA context) exceeds the GPU; nothing without one."""
    total = gpu_bytes()
    if total is None:
        return
    height, width = pipe.output_size(spec.portrait, spec.max_area)
    planner = gpu_planner(pipe)
    peak = _peak(spec, height, width, spec.kv_format, fp8_weights, planner)
    if fits_capacity(peak, total):
        return
    lighter = [
        f for f in KV_FORMATS if fits_capacity(_peak(spec, height, width, f, fp8_weights, planner), total)
    ]
    advice = (
        f"it fits with the KV-cache format {' or '.join(lighter)}"
        if lighter
        else "no KV-cache format makes it fit: choose ISPA alone or a smaller size"
    )
    on_ranks = isinstance(pipe, PipelineLead)
    raise ValidationError(
        f"This run does not fit the GPU{'s of the pipeline' if on_ranks else ''}: {spec.mode} at {height}×{width} "
        f"with {spec.kv_format} KV peaks at {peak / GIB:.2f} GiB{' on its heaviest rank' if on_ranks else ''} "
        f"by the memory plan, plus {CUDA_CONTEXT_BYTES / GIB:.1f} GiB for the CUDA context, "
        f"and the GPU has {total / GIB:.2f} GiB; {advice}."
    )


def _one_gpu(height: int, width: int, **settings: object) -> list[RunPlan]:
    return [plan_run(height, width, **settings)]


def _peak(
    spec: RunSpec, height: int, width: int, kv_format: str, fp8_weights: bool, planner: GPUPlanner
) -> int:
    """The run's peak on its heaviest GPU; compare mode's two runs share each GPU's model."""
    runs = [
        planner(
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
    if len(runs) == 1:
        return max(plan.peak_bytes for plan in runs[0])
    return max(compare_peak_bytes(*roles) for roles in zip(*runs, strict=True))
