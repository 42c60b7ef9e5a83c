"""Switch a variant's levers on around its runs, and off again after (`bench/suite/variants.py` names them).

A lever either changes the request (the step count) or flips an engine switch for the variant's runs; either way
the next variant starts from the settings it would have had without this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from bench.suite.variants import Variant


@contextmanager
def levers_on(pipe: Any, request: Any, variant: Variant) -> Iterator[Any]:
    """The request the variant's runs take, with every one of its levers on until the block exits."""
    from avatars.liveavatar.fp8_linear import fused_quantization, set_fused_quantization

    saved = pipe.statistics_precision, pipe.fused_merge, fused_quantization()
    if "stats-bf16" in variant.levers:
        pipe.statistics_precision = "bf16"
    pipe.fused_merge = "merge-fused" in variant.levers or pipe.fused_merge
    if "quant-fused" in variant.levers:
        set_fused_quantization(True)
    try:
        yield replace(request, steps=variant.steps)
    finally:
        pipe.statistics_precision, pipe.fused_merge = saved[:2]
        set_fused_quantization(saved[2])
