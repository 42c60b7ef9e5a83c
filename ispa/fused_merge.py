"""The LSE merge of local and history attention as one compiled function (issue 20 §3b, opt-in).

Eager, the session's merge is a dozen elementwise kernels per layer and forward (fp32 upcasts of both outputs, the
weights, logaddexp) plus two more reductions the session takes from the same LSEs: the history's LSE peak (the
NaN/+inf flag read at `end_block`) and the mean share of softmax mass on history. `merge_and_measure` computes all
four outputs in one `torch.compile`d function (Triton kernels on CUDA, C++ on a CPU), one graph per shape; the
eager path (`merge_math` and the same two reductions) stays the reference and the fallback: if compiling fails
(no compiler, an inductor error), a warning is logged once and the eager path serves from then on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from ispa.attention import check_merge_inputs, merge_math

__all__ = ["merge_and_measure"]

logger = logging.getLogger(__name__)
_broken: list[str] = []  # the compile failure, once one happened (the eager path serves from then on)


def _merge_and_measure(
    out_loc: Tensor, lse_loc: Tensor, out_hist: Tensor, lse_hist: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    out, _ = merge_math(out_loc, lse_loc, out_hist, lse_hist)
    peak = lse_hist.amax().float()
    share = torch.sigmoid(lse_hist - lse_loc).mean()  # exp(lse_hist − lse_union): the mass on history
    return out, peak, share


@functools.cache
def _compiled() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    return torch.compile(_merge_and_measure, dynamic=False)


def merge_and_measure(
    out_loc: Tensor, lse_loc: Tensor, out_hist: Tensor, lse_hist: Tensor, fused: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """(merged output, the history LSE's peak, the mean history share): compiled when `fused`, else eager."""
    check_merge_inputs(out_loc, lse_loc, out_hist, lse_hist)
    if fused and not _broken:
        try:
            return _compiled()(out_loc, lse_loc, out_hist, lse_hist)
        except Exception as err:  # noqa: BLE001 - any compile failure: the exact eager path takes over
            _broken.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            logger.warning(
                "the fused LSE merge failed to compile (%s); merging eagerly from now on", _broken[0]
            )
    return _merge_and_measure(out_loc, lse_loc, out_hist, lse_hist)
