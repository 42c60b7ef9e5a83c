"""Which of a model's sizes fit this machine's GPU, by the memory plan, and why the others do not.

The size dropdown offers LiveAvatar 14B only the sizes whose planned peak (the app's default run: ISPA, bf16 KV
history, the DiT weights as loaded) fits the detected GPU with room for the CUDA context. A size is an area bound;
it is planned at what it gives a 16:9 portrait (704×384 for the official area). Compare mode holds a second KV
cache on top, which this check does not count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from avatars.liveavatar.memory_plan import sizes_that_fit
from avatars.liveavatar.sizing import choose_size

PLANNED_ASPECT = (16, 9)  # height : width of the portrait a size is planned for


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
    """(the sizes that fit, a reason for each that does not); every size when there is no GPU to plan for."""
    total = gpu_bytes()
    if total is None:
        return list(sizes), []
    planned = [(label, *choose_size(*PLANNED_ASPECT, area, divisor)) for label, area in sizes]
    fits = sizes_that_fit(total, planned, weights="fp8" if fp8_weights else "bf16", kv_format="bf16")
    kept = [size for size, fit in zip(sizes, fits, strict=True) if fit.fits]
    return kept, [fit.reason for fit in fits if not fit.fits]
