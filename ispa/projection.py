"""Output projections as ISPA sees them: the base weight it learns against, and the updated projection it applies.

Two sessions (say Full and ISPA) may run on one model, so an absorbed layer must never write into the model's
weights. Each session keeps its own change instead, and applies it as a product of its own on the attention output:
`y = out_proj(a) + a ΔWᵀ`.

Why not one weight `W + ΔW`: the change is often far below the weight's rounding step. Re-quantizing `W + ΔW` to
per-tensor e4m3 snaps every element whose change is under half an FP8 step back to its old value (99 % of ΔW lost at
‖ΔW‖/‖W‖ = 1e-3), and rounding it to bf16 loses most of a small ΔW too. Stored on its own, ΔW keeps its relative
precision whatever its size: in bf16 that is ≤ 2⁻⁹ per element, so ≤ 0.2 % in Frobenius norm at any ratio.
Cost: one more [D_out, D] matrix per L-layer and one more GEMM of the projection's size per forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DeltaProjection", "activation_dtype", "base_weight"]


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


def activation_dtype(out_proj: nn.Module) -> torch.dtype:
    """The dtype a Linear-like module computes in: its `.weight`'s, else the `activation_dtype` a quantized module
    declares (e.g. FP8Linear: the model's bf16), else fp32."""
    weight = getattr(out_proj, "weight", None)
    if isinstance(weight, Tensor):
        return weight.dtype
    declared = getattr(out_proj, "activation_dtype", None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


class DeltaProjection:
    """Computes `out_proj(x) + x @ delta_weight.T` without touching `out_proj`.

    `delta_weight` ([D_out, D], the paper's ΔW transposed) is stored in the projection's activation dtype
    (`activation_dtype`: bf16 in a bf16 or FP8 model, fp32 in an fp32 one), so the extra product is a GEMM like the
    projection's own. When the dtypes match, the base output is added inside that GEMM (`addmm`): the change is
    accumulated in fp32 and the sum rounded once, instead of rounding the change first and the sum again.
    """

    def __init__(self, out_proj: nn.Module, delta_weight: Tensor) -> None:
        base = base_weight(out_proj)
        if tuple(delta_weight.shape) != tuple(base.shape):
            raise ValueError(
                f"delta_weight shape {tuple(delta_weight.shape)} != weight shape {tuple(base.shape)}"
            )
        self.out_proj = out_proj
        self.delta_weight = delta_weight.detach().to(device=base.device, dtype=activation_dtype(out_proj))

    def __call__(self, x: Tensor) -> Tensor:
        base = self.out_proj(x)
        delta = self.delta_weight
        if x.dtype == delta.dtype == base.dtype:
            flat = torch.addmm(base.reshape(-1, base.shape[-1]), x.reshape(-1, x.shape[-1]), delta.T)
            return flat.reshape(base.shape)
        return base + F.linear(x.to(delta.dtype), delta).to(base.dtype)

    def nbytes(self) -> int:
        """Bytes of the tensors this projection holds beyond those of `out_proj`."""
        return self.delta_weight.nbytes
