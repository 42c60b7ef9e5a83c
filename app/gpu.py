"""Hugging Face ZeroGPU support, optional: `gpu(...)` is `spaces.GPU` where the `spaces` package is installed
and a decorator that changes nothing elsewhere.

On a ZeroGPU Space a decorated generator runs in a forked worker that holds the GPU, so only picklable values
cross into it and nothing the main process changes later (a Stop or Recalibrate request, live microphone
audio) reaches it. `ON_ZERO_GPU` lets the UI say so and leave live mode out there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

try:  # `app.py` imports spaces before torch; this import then only picks up the module already loaded.
    import spaces
except ImportError:
    spaces = None

ON_ZERO_GPU = spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def gpu(duration: Callable[..., int] | int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`spaces.GPU(duration=...)` where available; `duration` may be a callable of the function's arguments."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)
