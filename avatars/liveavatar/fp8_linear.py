"""Per-tensor e4m3 FP8 linear layers: the compute that LiveAvatar's `--fp8` flag runs.

Why: FP8 halves the DiT's weight memory (33.2 GB → about 17.2 GB at 14B). The official scheme quantizes each weight
tensor with one fp32 scale; on Ada/Hopper GPUs (compute capability ≥ 8.9) the activations are quantized per tensor
too and `torch._scaled_mm` multiplies the two. Elsewhere (CPU, older GPUs) `FP8Linear` multiplies by the
dequantized weight instead, which is exact with respect to the stored FP8 weight.

The ISPA engine reads `dequantized_weight()` to learn its update and applies the update as a product of its own
(`ispa.projection.DeltaProjection`): re-quantizing `W + ΔW` to e4m3 would erase most of a small change.

The activations' quantization (amax, scale, scaled cast: several eager kernels per FP8 layer and forward) can run as
one compiled function instead, `set_fused_quantization(True)` (issue 20 §3c, off by default; a compile failure is
logged once and the eager quantization serves from then on). Its values and scale are the eager ones, tested on CPU.

This module sits below both `dit/` (whose attention runs these layers) and `weights/` (whose `fp8.py` converts a
loaded model's linear layers into them), so that neither folder has to import the other for it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
SCALED_MM_CAPABILITY = (8, 9)  # Ada/Hopper and later: the GPUs with an e4m3 `_scaled_mm`

logger = logging.getLogger(__name__)
_fused_quantization = {"enabled": False, "failed": None}  # process-wide, like the compiled regions' functions


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` to e4m3 with one scale for the whole tensor.

    Returns `(x_fp8, scale)` with `x ≈ x_fp8.float() * scale`; `scale` is a 0-dim fp32 tensor. As in the official
    code the multiplier `FP8_MAX / amax` is capped at `FP8_MAX`, so tensors with |x| < 1 are not blown up further.
    """
    amax = x.detach().abs().max().float()
    multiplier = (FP8_MAX / amax.clamp(min=1e-12)).clamp(max=FP8_MAX)
    x_fp8 = (x.detach() * multiplier).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_fp8, multiplier.reciprocal()


@functools.cache
def _compiled_quantize() -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return torch.compile(quantize_per_tensor)  # static shapes first; a new shape makes the graph dynamic


def set_fused_quantization(enabled: bool) -> None:
    """Quantize FP8 layers' activations with one compiled function (True) or eagerly (False, the default)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"fused quantization must be True or False, got {enabled!r}")
    _fused_quantization["enabled"] = enabled


def fused_quantization() -> bool:
    """Whether activations are quantized by the compiled function (on, and it has not failed to compile)."""
    return bool(_fused_quantization["enabled"]) and _fused_quantization["failed"] is None


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_tensor(x)`, compiled when `set_fused_quantization(True)`; the same values and scale."""
    if fused_quantization():
        try:
            return _compiled_quantize()(x)
        except Exception as err:  # noqa: BLE001 - any compile failure: the eager quantization takes over
            _fused_quantization["failed"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            logger.warning(
                "the fused FP8 quantization failed to compile (%s); quantizing eagerly from now on",
                _fused_quantization["failed"],
            )
    return quantize_per_tensor(x)


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 tensor an FP8 tensor and its scale stand for."""
    return x_fp8.float() * scale


# Whether each device multiplies with `_scaled_mm`, decided at its first FP8 forward there: the capability of a GPU
# does not change, and asking torch.cuda for it in every forward of every FP8 layer repeated the same question.
_SCALED_MM_BY_DEVICE: dict[torch.device, bool] = {}


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether FP8 layers on `device` run `torch._scaled_mm` (a CUDA GPU of capability ≥ 8.9), else the fallback.

    Asked once per device and process; later calls read the answer back."""
    supported = _SCALED_MM_BY_DEVICE.get(device)
    if supported is None:
        supported = device.type == "cuda" and torch.cuda.get_device_capability(device) >= SCALED_MM_CAPABILITY
        _SCALED_MM_BY_DEVICE[device] = supported
    return supported


@dataclass(frozen=True)
class QuantizedInput:
    """An activation quantized per tensor to e4m3, as `_scaled_mm` takes it: values [M, K], a 0-dim fp32 scale."""

    values: torch.Tensor
    scale: torch.Tensor
    leading_shape: tuple[int, ...]  # the activation's shape without its last (feature) dimension
    dtype: torch.dtype  # the activation's dtype, which the layers' outputs take

    @classmethod
    def of(cls, x: torch.Tensor) -> QuantizedInput:
        values, scale = quantize_activation(x.reshape(-1, x.shape[-1]))
        return cls(values, scale, tuple(x.shape[:-1]), x.dtype)


def linears_on_shared_input(layers: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]`, where FP8 layers running `_scaled_mm` share one quantization of `x`.

    Why: q, k and v read the same tensor; quantizing it (amax, scale, cast: a few passes over the activation) for
    each of them tripled that traffic. The products are the ones each layer alone computes, bit for bit.
    """
    if layers and all(isinstance(layer, FP8Linear) for layer in layers) and scaled_mm_supported(x.device):
        shared = QuantizedInput.of(x)
        return [layer.forward_quantized(shared) for layer in layers]
    return [layer(x) for layer in layers]


class FP8Linear(nn.Module):
    """A linear layer whose weight is stored as e4m3 plus one fp32 scale; the bias keeps its dtype.

    `activation_dtype` is the dtype of the inputs and outputs (the model's, e.g. bf16): what a change applied next
    to this layer (`ispa.projection.DeltaProjection`) is stored in.
    """

    def __init__(
        self,
        weight_fp8: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        activation_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        if weight_fp8.dtype != FP8_DTYPE or weight_fp8.dim() != 2:
            raise ValueError(
                f"weight_fp8 must be a 2-D {FP8_DTYPE} tensor, got {weight_fp8.dtype} {tuple(weight_fp8.shape)}"
            )
        if not activation_dtype.is_floating_point or activation_dtype.itemsize < 2:
            raise ValueError(f"activation_dtype must be a 16- or 32-bit float dtype, got {activation_dtype}")
        self.out_features, self.in_features = weight_fp8.shape
        self.activation_dtype = activation_dtype
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.float().reshape(()))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        weight_fp8, scale = quantize_per_tensor(linear.weight)
        return cls(weight_fp8, scale, linear.bias, activation_dtype=linear.weight.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight this layer multiplies by, shape [out_features, in_features]."""
        return dequantize(self.weight_fp8, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if scaled_mm_supported(x.device):
            return self.forward_quantized(QuantizedInput.of(x))
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.dequantized_weight(), bias).to(x.dtype)

    def forward_quantized(self, x: QuantizedInput) -> torch.Tensor:
        """The `_scaled_mm` product with an input quantized already (possibly shared with other layers)."""
        if x.values.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.values.shape[-1]} features, this layer takes {self.in_features}")
        out = torch._scaled_mm(
            x.values,
            self.weight_fp8.t(),
            scale_a=x.scale,
            scale_b=self.weight_scale,
            bias=None if self.bias is None else self.bias.to(torch.bfloat16),
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
        return out.reshape(*x.leading_shape, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"activation_dtype={self.activation_dtype}"
        )
