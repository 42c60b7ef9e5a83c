"""Hugging Face ZeroGPU support, optional: `gpu(...)` is `spaces.GPU` where the `spaces` package is installed
and a decorator that changes nothing elsewhere (spaces itself returns the function unchanged off a ZeroGPU Space).

On a ZeroGPU Space a decorated generator runs in a worker process forked for the call (kept for the next call
while idle), which holds the GPU: its arguments and every value it yields are pickled across, so it yields no
tensors, and nothing the main process changes later (a Stop or Recalibrate request, live microphone audio)
reaches it. The main process sees a patched torch: `.to("cuda")` there is intercepted and the weights are packed
when the app launches, then moved onto the GPU in each worker; so the real model is loaded at start-up, in the
main process (`app.models.preload_for_zero_gpu`), and never compiled (`torch.compile` is not supported there).
`ON_ZERO_GPU` lets the UI say so and leave live mode out there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from app.gpu_time import GpuBudget

try:  # `app.py` imports spaces before torch; this import then only picks up the module already loaded.
    import spaces
except ImportError:
    spaces = None

ON_ZERO_GPU = spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
# The ZeroGPU H200 slice as spaces 0.51.3 describes it when it cannot read the driver (its configs.json).
DEFAULT_CARD = {"memory": 74_625_056_768, "sm_count": 60, "duration_factor": 1.0}


def gpu(duration: Callable[..., int] | int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`spaces.GPU(duration=...)` where available; `duration` may be a callable of the function's arguments."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def zero_gpu_card() -> dict[str, Any]:
    """What spaces knows of the card a ZeroGPU call gets: total memory (bytes), SM count, the factor it scales
    requested durations by. Read from spaces' own table by the driver's model name; its H200 slice without one."""
    if spaces is None:
        return dict(DEFAULT_CARD)
    from spaces.zero.config import get_config

    config = get_config()
    return {key: config[key] for key in DEFAULT_CARD}


@lru_cache(maxsize=1)
def gpu_budget() -> GpuBudget:
    """The GPU-time formula's terms on this Space's card (`app.gpu_time`)."""
    card = zero_gpu_card()
    return GpuBudget.for_card(card["sm_count"], card["duration_factor"], os.environ)
