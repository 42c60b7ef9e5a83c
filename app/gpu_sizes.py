"""Which of a backend's sizes fit this machine's GPU, and whether one run's settings do, by its memory plan.

The size dropdown offers the sizes whose lightest run (Full with the lightest KV format, `ispa.LIGHTEST_KV_FORMAT`,
the weights as loaded) fits the detected GPU with room for the CUDA context; a size is an area bound, planned at
what the backend says it gives before any portrait is seen (`AvatarBackend.planned_size`). When a run is asked
for, its own settings are planned at the portrait's own size (the KV format, the policy's statistics and ΔW, and in
compare mode both runs' caches), and a run that would not fit is refused before anything is allocated, with the
formats that would.

A backend over several GPUs (a pipeline of ranks) gives one plan per kind of GPU it uses
(`AvatarBackend.memory_plans`): the heaviest is planned, every GPU taken as large as this process's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from app.inputs import RunSpec
from app.validation import ValidationError
from avatars.base import AvatarBackend
from avatars.memory import CUDA_CONTEXT_BYTES, GIB, MemoryPlan, compare_peak_bytes, fits_capacity
from ispa import KV_FORMATS, LIGHTEST_KV_FORMAT, FullPolicy, ISPAPolicy


def gpu_total_bytes(device: torch.device) -> int | None:
    """Total memory of `device` when it is a CUDA GPU; None otherwise (nothing to plan for: the tiny model runs on
    the CPU even on a machine with GPUs)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def sizes_for_gpu(
    backend: AvatarBackend, *, gpu_bytes: Callable[[torch.device], int | None] = gpu_total_bytes
) -> tuple[list[tuple[str, int]], list[str]]:
    """(the backend's sizes whose lightest run fits, a reason for each that does not); every size without a GPU
    to plan for."""
    sizes = backend.size_choices()
    total = gpu_bytes(backend.device)
    if total is None:
        return sizes, []
    kept, reasons = [], []
    for label, area in sizes:
        height, width = backend.planned_size(area)
        plans = backend.memory_plans(height, width, FullPolicy(), LIGHTEST_KV_FORMAT)
        heaviest = max(plans, key=lambda plan: plan.peak_bytes)
        peak = heaviest.peak_bytes
        if fits_capacity(peak, total):
            kept.append((label, area))
            continue
        reasons.append(
            f"{label}: peak {peak / GIB:.2f} GiB + {CUDA_CONTEXT_BYTES / GIB:.1f} GiB CUDA context does not fit "
            f"in {total / GIB:.2f} GiB ({_described(heaviest)})"
        )
    return kept, reasons


def check_run_fits(
    spec: RunSpec,
    backend: AvatarBackend,
    *,
    gpu_bytes: Callable[[torch.device], int | None] = gpu_total_bytes,
) -> None:
    """Refuse, in our words, a run whose planned peak (plus the CUDA context) exceeds the GPU; nothing without one."""
    total = gpu_bytes(backend.device)
    if total is None:
        return
    height, width = backend.output_size(spec.portrait, spec.max_area)
    peak, on_ranks = _peak(spec, backend, height, width, spec.kv_format)
    if fits_capacity(peak, total):
        return
    lighter = [f for f in KV_FORMATS if fits_capacity(_peak(spec, backend, height, width, f)[0], total)]
    advice = (
        f"it fits with the KV-cache format {' or '.join(lighter)}"
        if lighter
        else "no KV-cache format makes it fit: choose ISPA alone or a smaller size"
    )
    raise ValidationError(
        f"This run does not fit the GPU{'s of the pipeline' if on_ranks else ''}: {spec.mode} at {height}×{width} "
        f"with {spec.kv_format} KV peaks at {peak / GIB:.2f} GiB{' on its heaviest rank' if on_ranks else ''} "
        f"by the memory plan, plus {CUDA_CONTEXT_BYTES / GIB:.1f} GiB for the CUDA context, "
        f"and the GPU has {total / GIB:.2f} GiB; {advice}."
    )


def settings_that_fit(
    backend: AvatarBackend, *, gpu_bytes: Callable[[torch.device], int | None] = gpu_total_bytes
) -> list[str]:
    """Per size, the KV formats with which a Full run, an ISPA run (its default k_fraction and T_warm) and
    compare mode fit the GPU by the memory plan, one line each, for the size chooser; [] without a GPU. Planned
    once per backend and GPU size (each plan is a model built on `meta`)."""
    total = gpu_bytes(backend.device)
    if total is None:
        return []
    key = (id(backend), total)
    if key not in _FITTING:
        _FITTING[key] = [_fitting_line(backend, label, area, total) for label, area in backend.size_choices()]
    return _FITTING[key]


_FITTING: dict[tuple[int, int], list[str]] = {}


def _fitting_line(backend: AvatarBackend, label: str, area: int, total: int) -> str:
    height, width = backend.planned_size(area)
    fits: dict[str, list[str]] = {"Full": [], "ISPA": [], "compare": []}
    for kv_format in KV_FORMATS:
        full = backend.memory_plans(height, width, FullPolicy(), kv_format)
        ispa = backend.memory_plans(height, width, ISPAPolicy(), kv_format)
        peaks = {
            "Full": max(plan.peak_bytes for plan in full),
            "ISPA": max(plan.peak_bytes for plan in ispa),
            "compare": max(compare_peak_bytes(*pair) for pair in zip(full, ispa, strict=True)),
        }
        for mode, peak in peaks.items():
            if fits_capacity(peak, total):
                fits[mode].append(kv_format)
    return f"{label}: " + "; ".join(
        f"{mode} {', '.join(formats) or 'none'}" for mode, formats in fits.items()
    )


def _peak(spec: RunSpec, backend: AvatarBackend, height: int, width: int, kv_format: str) -> tuple[int, bool]:
    """(the run's peak on its heaviest GPU, whether the backend uses several kinds of GPU); compare mode's runs (two,
    or three with a Full run to measure drift against) share each GPU's model."""
    runs = [backend.memory_plans(height, width, policy, kv_format) for _, policy in spec.policies()]
    several = len(runs[0]) > 1
    if len(runs) == 1:
        return max(plan.peak_bytes for plan in runs[0]), several
    return max(compare_peak_bytes(*plans) for plans in zip(*runs, strict=True)), several


def _described(plan: MemoryPlan) -> str:
    """The settings that matter to a size's verdict, as far as the plan names them."""
    settings = plan.settings
    parts = [
        f"{settings['weights']} weights" if "weights" in settings else None,
        f"{settings['kv_format']} KV" if "kv_format" in settings else None,
        str(settings["policy"]) if "policy" in settings else None,
    ]
    return ", ".join(part for part in parts if part)
