"""Output projections as ISPA sees them: the base weight it learns against, and the updated projection it applies.

Two sessions (say Full and ISPA) may run on one model, so an absorbed layer must never write into the model's
weights. Each session keeps its own effective projection instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DeltaProjection", "base_weight"]


def base_weight(out_proj: nn.Module) -> Tensor:
    """The real-valued weight [D_out, D] of a Linear-like module, detached.

    `.weight` when the module has one (nn.Linear); a module that stores its weight quantized (e.g. FP8) can
    provide `dequantized_weight()` instead.
    """
    weight = getattr(out_proj, "weight", None)
    if isinstance(weight, Tensor):
        return weight.detach()
    dequantized = getattr(out_proj, "dequantized_weight", None)
    if callable(dequantized):
        return dequantized().detach()
    raise ValueError(f"{type(out_proj).__name__} exposes neither a .weight tensor nor dequantized_weight()")


class DeltaProjection:
    """Computes `x @ (weight + delta_weight).T + bias` for a Linear-like `out_proj`.

    If `out_proj` offers `with_weight_delta(delta_weight) -> callable` (e.g. an FP8 linear that must re-quantize),
    that callable is used. Otherwise the effective weight is built once, in the weight's dtype, and the module's
    current bias is used at every call.
    """

    def __init__(self, out_proj: nn.Module, delta_weight: Tensor) -> None:
        self.out_proj = out_proj
        self.weight: Tensor | None = None
        self._custom: Callable[[Tensor], Tensor] | None = None
        if hasattr(out_proj, "with_weight_delta"):
            self._custom = out_proj.with_weight_delta(delta_weight)
        else:
            base = base_weight(out_proj)
            self.weight = (base.float() + delta_weight.to(device=base.device, dtype=torch.float32)).to(
                base.dtype
            )

    def __call__(self, x: Tensor) -> Tensor:
        if self._custom is not None:
            return self._custom(x)
        return F.linear(x, self.weight, self.out_proj.bias)

    def nbytes(self) -> int:
        """Bytes of the tensors this projection holds beyond those of `out_proj`."""
        if self.weight is not None:
            return self.weight.nbytes
        if not isinstance(self._custom, nn.Module):
            return 0  # an opaque callable: nothing we can count
        shared = {t.data_ptr() for t in (*self.out_proj.parameters(), *self.out_proj.buffers())}
        own = (*self._custom.parameters(), *self._custom.buffers())
        return sum(t.nbytes for t in own if t.data_ptr() not in shared)
