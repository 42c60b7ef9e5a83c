"""How precisely the warmup statistics' GEMMs run: "exact" fp32, "fast" TF32 on CUDA, or "bf16" GEMMs with fp32
output (an opt-in lever, issue 20 §3a).

Why "fast" is safe for 16-bit models: G = A_locᵀA_loc and C = A_locᵀ(A_full − A_loc) are fp32 GEMMs. TF32 keeps 10
of fp32's 23 mantissa bits for the GEMM *inputs* and accumulates in fp32. A bf16 or fp16 A_loc (7 or 10 mantissa bits)
is exact in TF32, so G is unchanged; only the gap A_full − A_loc (a difference of two 16-bit numbers) and an fp32
weight (e.g. a dequantized FP8 one, used for s only) are rounded, by at most 2⁻¹⁰ of each element (2⁻¹¹ with
round-to-nearest). Bound, with u = 2⁻¹⁰: ΔW moves by at most u relative (through C's rounded gap alone), and ε by
at most 4u · s (s = ‖(A_full − A_loc) Wᵀ‖² has two rounded factors, squared). `tests/ispa/test_statistics_precision.py`
emulates the rounding on the CPU and checks the fp64 solve against the one from unrounded statistics:
‖ΔW_fast − ΔW‖ ≤ 2⁻¹⁰ ‖ΔW‖ and |ε_fast − ε| ≤ 2⁻⁸ s.
For fp32 activations A_loc itself would round and G's conditioning could amplify it, so "fast" leaves their GEMMs
in fp32. The estimated gain at 14B is ≈ 0.3 s per warmup forward on an H100/H200 (audit estimate, not measured).

"bf16" (for bf16 activations; other activations get "fast"'s GEMMs): no fp32 copy of A_loc or A_full is made. G is
one bf16 GEMM with fp32 output: a bf16 A_loc's products are exact, so G differs from "exact" by the order of its
fp32 sums only. C needs the gap, which bf16 cannot hold: it is split into hi = bf16(gap) and lo = bf16(gap − hi),
and C = A_locᵀ hi + A_locᵀ lo (two bf16 GEMMs); hi + lo keeps 16 of the gap's mantissa bits, so C's inputs move by
at most 2⁻¹⁶ of each element (relative), against TF32's 2⁻¹⁰. s takes hi alone against the weight rounded to bf16
(one GEMM; both factors within 2⁻⁹ of each element, exact for a bf16 weight). Stated bounds,
checked against the fp64 solve in `tests/ispa/test_statistics_precision.py`: ‖ΔW_bf16 − ΔW‖ ≤ 2⁻¹⁴ ‖ΔW‖ and
|ε_bf16 − ε| ≤ 2⁻⁷ s. On a CPU (no bf16 GEMM with fp32 output there) the same arithmetic runs in fp32, where a bf16
value and the product of two are exact: the CPU computes what the GPU does, up to the order of the sums.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch

__all__ = [
    "StatisticsPrecision",
    "bf16_gemm",
    "check_statistics_precision",
    "split_bf16",
    "default_statistics_precision",
    "statistics_gemms",
]

StatisticsPrecision = Literal["exact", "fast", "bf16"]
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def check_statistics_precision(precision: object) -> StatisticsPrecision:
    """`precision` itself when it is a valid setting; a ValueError naming the field otherwise."""
    if precision not in get_args(StatisticsPrecision):
        raise ValueError(
            f"statistics_precision must be one of {get_args(StatisticsPrecision)}, got {precision!r}"
        )
    return precision  # type: ignore[return-value]


def default_statistics_precision(device: torch.device | str) -> StatisticsPrecision:
    """ "fast" on CUDA (TF32 is where the time goes), "exact" elsewhere (CPUs have no TF32: nothing to gain)."""
    return "fast" if torch.device(device).type == "cuda" else "exact"


@contextmanager
def statistics_gemms(
    precision: StatisticsPrecision, device: torch.device, activations: torch.dtype
) -> Iterator[None]:
    """Run the enclosed fp32 GEMMs in TF32 ("fast", 16-bit activations, CUDA) or in full fp32 (otherwise).

    "exact" on CUDA also forces IEEE fp32 when a caller enabled TF32 globally. The process-wide cuBLAS setting is
    restored on exit (only the new `fp32_precision` API is used: mixing it with `allow_tf32` makes torch raise).
    """
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    fast = precision in ("fast", "bf16")  # "bf16" with other activations than bf16 runs "fast"'s GEMMs
    matmul.fp32_precision = "tf32" if fast and activations in _HALF_DTYPES else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def bf16_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` of two bf16 matrices in fp32: cuBLAS's bf16 GEMM with fp32 output on CUDA; elsewhere the same sums
    in fp32 (bf16 values and their products are exact in fp32)."""
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) in bf16 with hi + lo = x to 16 mantissa bits: hi = bf16(x), lo = bf16(x − hi)."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)
