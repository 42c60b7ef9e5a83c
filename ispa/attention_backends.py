"""The attention kernels that return a log-sum-exp, and the rule that picks one.

Every kernel takes q, k, v as [B, L, H, D] and returns (out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] fp32, natural
log of the scaled scores); k and v are never empty here (`attention_with_lse` handles that).

Selection rule: a call with `backend=None` uses the first backend of the preference order that runs on the tensors'
device, is installed and supports their dtype and head_dim. The order is fastest first, by the audit's estimates for
Hopper at head_dim 128 (not measured): FA3 and cuDNN ≈ 550–650 TFLOP/s, flash-attn 2 and PyTorch's own flash kernel
≈ 300–370. The environment variable ISPA_ATTENTION_BACKENDS (comma-separated names) replaces the order, e.g.
`ISPA_ATTENTION_BACKENDS=torch_cuda,math` if cuDNN refuses a shape; `backend=` names one backend for a call.

- ``flash_attn3``: FA3 (`flash_attn_interface`, Hopper builds), fp16/bf16, when it imports.
- ``cudnn``: PyTorch's cuDNN attention, fp16/bf16, head_dim ≤ 128, on compute capability ≥ 9.0; its LSE comes as
  [B, H, Lq, 1].
- ``flash_attn``: flash-attn 2 (fp16/bf16), when `flash_attn_func` imports.
- ``torch_cuda``: PyTorch's CUDA flash kernel (fp16/bf16), or its memory-efficient kernel for other dtypes.
- ``torch_cpu``: PyTorch's fused CPU flash kernel.
- ``math``: plain matrix products in fp32 (fp64 for fp64 inputs); the reference the others are tested against.

An optional package is imported once: a build that fails to load (ABI mismatch, missing CUDA library) or lacks the
function (the FA4-only `flash_attn` namespace package) is skipped with one warning instead of raising at the first
attention call.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PREFERENCE_ENV", "available_backends", "preference_order", "resolve_backend"]

logger = logging.getLogger(__name__)

PREFERENCE_ENV = "ISPA_ATTENTION_BACKENDS"

KernelFn = Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256
_CUDNN_MAX_HEAD_DIM = 128


@dataclass(frozen=True)
class Backend:
    name: str
    kernel: KernelFn
    device_type: str | None  # None: runs on any device
    supports: Callable[[torch.dtype, int], bool]  # (dtype, head_dim) -> usable
    installed: Callable[[], bool]


def _always() -> bool:
    return True


@functools.cache
def optional_function(module: str, name: str) -> Callable | None:
    """`module.name`, imported once; None when the package is absent (silently) or broken (one warning)."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as error:  # a failing extension raises ImportError, OSError or RuntimeError
        root = module.partition(".")[0]
        if not (isinstance(error, ModuleNotFoundError) and error.name == root):  # absent: nothing to say
            logger.warning(
                "%s.%s cannot be imported (%s); using the next attention backend", module, name, error
            )
        return None


def _as_bhl(lse: Tensor, q: Tensor) -> Tensor:
    """A kernel's LSE as [B, H, Lq] fp32: cuDNN returns [B, H, Lq, 1]; anything else is refused, not guessed."""
    batch, queries, heads, _ = q.shape
    if lse.shape not in ((batch, heads, queries), (batch, heads, queries, 1)):
        raise RuntimeError(
            f"attention kernel returned an LSE of shape {tuple(lse.shape)}; expected [B, H, Lq] = "
            f"{(batch, heads, queries)} or [B, H, Lq, 1]"
        )
    return lse.reshape(batch, heads, queries).float()


def _cudnn_kernel(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D] views
    # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, *, scale)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        qt, kt, vt, None, True, 0.0, False, False, scale=scale
    )[:2]
    return out.transpose(1, 2), _as_bhl(lse, q)


def _flash_attn_kernel(module: str) -> KernelFn:
    """The kernel of flash-attn 2 (`flash_attn`) or FA3 (`flash_attn_interface`): one calling convention.

    With return_attn_probs=True both return the output and softmax_lse [B, H, Lq] first (flash-attn 2 adds an
    S_dmask that is only materialised when dropout > 0, so asking for the LSE costs nothing).
    """

    def kernel(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        flash_attn_func = optional_function(module, "flash_attn_func")
        result = flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
        return result[0], _as_bhl(result[1], q)

    return kernel


def _importable(module: str) -> Callable[[], bool]:
    return lambda: optional_function(module, "flash_attn_func") is not None


def _torch_cuda_kernel(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D] views
    use_flash = (
        q.dtype in _HALF_DTYPES
        and q.shape[-1] <= _FLASH_MAX_HEAD_DIM
        and torch.backends.cuda.is_flash_attention_available()
    )
    if use_flash:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            qt, kt, vt, 0.0, False, False, scale=scale
        )[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, None, True, 0.0, False, scale=scale
        )[:2]
        # The memory-efficient kernel pads its log-sum-exp along the query axis to a multiple of 32.
        lse = lse[..., : q.shape[1]]
    return out.transpose(1, 2), lse.float()


def _torch_cpu_kernel(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, scale=scale)
    return out.transpose(1, 2), lse.float()


def _math_kernel(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k.to(compute)) * scale
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Lq]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(compute))
    return out.to(q.dtype), lse.float()


def _half_and_flash_head_dim(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in _HALF_DTYPES and head_dim <= _FLASH_MAX_HEAD_DIM


def _half_and_cudnn_head_dim(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in _HALF_DTYPES and head_dim <= _CUDNN_MAX_HEAD_DIM and head_dim % 8 == 0


def _floating(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype.is_floating_point


def _cudnn_installed() -> bool:
    # PyTorch itself only prefers cuDNN attention from Hopper on; earlier GPUs keep the flash kernel.
    return (
        torch.cuda.is_available()
        and torch.backends.cudnn.is_available()
        and torch.cuda.get_device_capability() >= (9, 0)
    )


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "flash_attn3",
            _flash_attn_kernel("flash_attn_interface"),
            "cuda",
            _half_and_flash_head_dim,
            _importable("flash_attn_interface"),
        ),
        Backend("cudnn", _cudnn_kernel, "cuda", _half_and_cudnn_head_dim, _cudnn_installed),
        Backend(
            "flash_attn",
            _flash_attn_kernel("flash_attn"),
            "cuda",
            _half_and_flash_head_dim,
            _importable("flash_attn"),
        ),
        Backend("torch_cuda", _torch_cuda_kernel, "cuda", _floating, _always),
        Backend("torch_cpu", _torch_cpu_kernel, "cpu", _floating, _always),
        Backend("math", _math_kernel, None, _floating, _always),
    )
}


def preference_order() -> list[str]:
    """The backend names `backend=None` tries, in order: ISPA_ATTENTION_BACKENDS if set, else fastest first."""
    value = os.environ.get(PREFERENCE_ENV, "").strip()
    if not value:
        return list(BACKENDS)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise ValueError(
            f"{PREFERENCE_ENV} names unknown attention backends {unknown}; known: {list(BACKENDS)}"
        )
    return names


def _runs_on(backend: Backend, device_type: str) -> bool:
    return backend.device_type in (None, device_type) and backend.installed()


def available_backends(device: torch.device | str) -> list[str]:
    """Names of the backends installed for `device`, in the order `backend=None` tries them (dtype limits aside)."""
    device_type = torch.device(device).type
    return [name for name in preference_order() if _runs_on(BACKENDS[name], device_type)]


def resolve_backend(name: str | None, device_type: str, dtype: torch.dtype, head_dim: int) -> Backend:
    """The backend a call uses: `name` if given (checked), else the first of `preference_order()` that fits."""
    if name is None:
        for candidate in preference_order():
            backend = BACKENDS[candidate]
            if _runs_on(backend, device_type) and backend.supports(dtype, head_dim):
                return backend
        raise ValueError(
            f"no attention backend of {preference_order()} supports {dtype} with head_dim {head_dim} on {device_type}"
        )
    backend = BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(BACKENDS)}")
    if not _runs_on(backend, device_type):
        raise ValueError(
            f"attention backend {name!r} is not available on {device_type}; "
            f"available: {available_backends(device_type)}"
        )
    if not backend.supports(dtype, head_dim):
        raise ValueError(f"attention backend {name!r} does not support {dtype} with head_dim {head_dim}")
    return backend
