"""Attention that also returns its log-sum-exp, and the exact merge of partial attentions.

ISPA splits every self-attention over two key sets (local = sink + current block, history = the ring) and fuses the
two results with their log-sum-exp (paper Eq. 9-12). Attention over the union of keys is recovered exactly, so a run
that decomposes its attention generates the same video as one that does not.

Layout is [B, L, H, D] everywhere (the flash-attn and Wan layout); log-sum-exps are [B, H, Lq], fp32, natural log.
Several kernels can produce the log-sum-exp; they live in a small registry, tried in order of preference:

- ``flash_attn``: flash-attn 2 on CUDA (fp16/bf16), when it imports (tried once; a broken install is logged and skipped).
- ``torch_cuda``: PyTorch's CUDA flash kernel (fp16/bf16), or its memory-efficient kernel for other dtypes.
- ``torch_cpu``: PyTorch's fused CPU flash kernel.
- ``math``: plain matrix products in fp32 (fp64 for fp64 inputs); the reference the others are tested against.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["attention_with_lse", "merge_attention", "available_backends"]

logger = logging.getLogger(__name__)

# (q, k, v, scale) -> (out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] fp32); k and v are never empty here.
KernelFn = Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class _Backend:
    name: str
    kernel: KernelFn
    device_type: str | None  # None: runs on any device
    supports: Callable[[torch.dtype, int], bool]  # (dtype, head_dim) -> usable
    installed: Callable[[], bool]


def _always() -> bool:
    return True


@functools.cache
def _flash_attn_func() -> Callable | None:
    """flash-attn 2's `flash_attn_func`, imported once; None when it is absent or cannot be imported.

    Finding the package is not enough: an ABI-mismatched build fails when its extension loads, and the FA4-only
    `flash_attn` namespace package has no `flash_attn_func`. Either would otherwise raise at the first attention
    call; here it is reported once and the next backend is used.
    """
    try:
        from flash_attn import flash_attn_func
    except Exception as error:  # a failing extension raises ImportError, OSError or RuntimeError
        if not (
            isinstance(error, ModuleNotFoundError) and error.name == "flash_attn"
        ):  # absent: nothing to say
            logger.warning("flash_attn cannot be imported (%s); using the next attention backend", error)
        return None
    return flash_attn_func


def _flash_attn_installed() -> bool:
    return _flash_attn_func() is not None


def _flash_attn_kernel(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    flash_attn_func = _flash_attn_func()
    # With return_attn_probs=True flash-attn 2 returns (out, softmax_lse [B, H, Lq], S_dmask); the mask is only
    # materialised when dropout > 0, so asking for it costs nothing here.
    result = flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
    return result[0], result[1].float()


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


def _floating(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype.is_floating_point


_BACKENDS: dict[str, _Backend] = {
    b.name: b
    for b in (
        _Backend("flash_attn", _flash_attn_kernel, "cuda", _half_and_flash_head_dim, _flash_attn_installed),
        _Backend("torch_cuda", _torch_cuda_kernel, "cuda", _floating, _always),
        _Backend("torch_cpu", _torch_cpu_kernel, "cpu", _floating, _always),
        _Backend("math", _math_kernel, None, _floating, _always),
    )
}


def available_backends(device: torch.device | str) -> list[str]:
    """Names of the backends installed for `device`, most preferred first (dtype limits aside)."""
    device_type = torch.device(device).type
    return [b.name for b in _BACKENDS.values() if b.device_type in (None, device_type) and b.installed()]


def _resolve_backend(name: str | None, q: Tensor) -> _Backend:
    head_dim = q.shape[-1]
    if name is None:
        for backend in _BACKENDS.values():
            if (
                backend.device_type in (None, q.device.type)
                and backend.supports(q.dtype, head_dim)
                and backend.installed()
            ):
                return backend
        raise ValueError(f"no attention backend supports {q.dtype} on {q.device}")
    backend = _BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    if backend.device_type not in (None, q.device.type) or not backend.installed():
        raise ValueError(
            f"attention backend {name!r} is not available on {q.device}; available: {available_backends(q.device)}"
        )
    if not backend.supports(q.dtype, head_dim):
        raise ValueError(f"attention backend {name!r} does not support {q.dtype} with head_dim {head_dim}")
    return backend


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for label, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{label} must be [B, L, H, D], got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head_dim")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Softmax attention of `q` over `k`/`v`, plus the natural-log log-sum-exp of the scaled scores.

    Parameters
    ----------
    q : [B, Lq, H, D]
    k, v : [B, Lk, H, D]; Lk may be 0 (no history yet).
    scale : score scale, default 1/sqrt(D).
    backend : a name from `available_backends`, or None for the best one for q's device and dtype.

    Returns
    -------
    out : [B, Lq, H, D] in q's dtype (zeros when Lk = 0).
    lse : [B, H, Lq] fp32 (-inf when Lk = 0, so the result merges with weight 0).
    """
    _check_qkv(q, k, v)
    chosen = _resolve_backend(backend, q)
    batch, num_queries, heads, head_dim = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if k.shape[1] == 0 or num_queries == 0:
        # Kernels must never see an empty key (or query) set: PyTorch's CPU flash kernel dies with SIGFPE on it.
        out = torch.zeros_like(q)
        lse = torch.full((batch, heads, num_queries), -math.inf, dtype=torch.float32, device=q.device)
        return out, lse
    return chosen.kernel(q, k, v, scale)


def _checked_log_weight(label: str, lse: Tensor) -> Tensor:
    """The LSE as an fp32 log-weight; NaN or +inf (a numeric failure upstream) raises instead of merging as 0.

    Empty key sets never reach a kernel (`attention_with_lse` returns -inf for them), so -inf is the only
    non-finite value that means "no mass". `_assert_async` checks without a host sync: on the CPU it raises at
    once, on CUDA it is a device-side assert that stops the run at its next synchronisation.
    """
    lse = lse.float()
    torch._assert_async(
        ~(torch.isnan(lse) | torch.isposinf(lse)).any(),
        f"merge_attention: {label} holds NaN or +inf (a numeric failure in the attention that produced it)",
    )
    return lse


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Fuse two attentions of the same queries over disjoint key sets into attention over their union.

    Each part is weighted by its share of the softmax mass, exp(lse_part - lse_union), computed in fp32. A part
    with no keys (lse -inf) gets weight 0; if both are empty the output is 0 and the lse -inf. An lse of NaN or
    +inf raises (RuntimeError).

    Parameters
    ----------
    out_a, out_b : [B, L, H, D]
    lse_a, lse_b : [B, H, L]

    Returns
    -------
    out : [B, L, H, D] in out_a's dtype.
    lse : [B, H, L] fp32.
    """
    if out_a.shape != out_b.shape or out_a.ndim != 4:
        raise ValueError(
            f"outputs must both be [B, L, H, D], got {tuple(out_a.shape)} and {tuple(out_b.shape)}"
        )
    batch, length, heads, _ = out_a.shape
    for label, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != (batch, heads, length):
            raise ValueError(f"{label} must be [B, H, L] = {(batch, heads, length)}, got {tuple(lse.shape)}")
    log_a, log_b = _checked_log_weight("lse_a", lse_a), _checked_log_weight("lse_b", lse_b)
    lse = torch.logaddexp(log_a, log_b)
    # Where both parts are empty lse is -inf; shifting by 0 there keeps both weights at exactly 0 instead of NaN.
    shift = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(log_a - shift).transpose(1, 2).unsqueeze(-1)  # [B, L, H, 1]
    weight_b = torch.exp(log_b - shift).transpose(1, 2).unsqueeze(-1)
    out = weight_a * out_a.float() + weight_b * out_b.float()
    return out.to(out_a.dtype), lse
