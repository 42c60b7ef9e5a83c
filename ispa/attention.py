"""Attention that also returns its log-sum-exp, and the exact merge of partial attentions.

ISPA splits every self-attention over two key sets (local = sink + current block, history = the ring) and fuses the
two results with their log-sum-exp (paper Eq. 9-12). Attention over the union of keys is recovered exactly, so a run
that decomposes its attention generates the same video as one that does not.

Layout is [B, L, H, D] everywhere (the flash-attn and Wan layout); log-sum-exps are [B, H, Lq], fp32, natural log.
The kernels that produce the log-sum-exp, and the rule that picks one, are in `ispa.attention_backends`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ispa.attention_backends import available_backends, resolve_backend

__all__ = ["attention_with_lse", "merge_attention", "available_backends"]


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
    backend : a name from `available_backends`, or None for the first one the selection rule allows
        (`ispa.attention_backends`).

    Returns
    -------
    out : [B, Lq, H, D] in q's dtype (zeros when Lk = 0).
    lse : [B, H, Lq] fp32 (-inf when Lk = 0, so the result merges with weight 0).
    """
    _check_qkv(q, k, v)
    chosen = resolve_backend(backend, q.device.type, q.dtype, q.shape[-1])
    batch, num_queries, heads, head_dim = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if k.shape[1] == 0 or num_queries == 0:
        # Kernels must never see an empty key (or query) set: PyTorch's CPU flash kernel dies with SIGFPE on it.
        out = torch.zeros_like(q)
        lse = torch.full((batch, heads, num_queries), -math.inf, dtype=torch.float32, device=q.device)
        return out, lse
    return chosen.kernel(q, k, v, scale)


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Fuse two attentions of the same queries over disjoint key sets into attention over their union.

    Each part is weighted by its share of the softmax mass, exp(lse_part - lse_union), computed in fp32. A part
    with no keys (lse -inf) gets weight 0; if both are empty the output is 0 and the lse -inf. An lse of NaN or
    +inf (a numeric failure upstream) is never taken for an empty part: that query's output is NaN. Checking for
    it is the caller's: a check here would either read back to the host or, on CUDA, be a device-side assert that
    kills the process's CUDA context; `AttentionSession` flags it on the device and raises at `end_block`.

    Parameters
    ----------
    out_a, out_b : [B, L, H, D]
    lse_a, lse_b : [B, H, L]

    Returns
    -------
    out : [B, L, H, D] in out_a's dtype.
    lse : [B, H, L] fp32.
    """
    check_merge_inputs(out_a, lse_a, out_b, lse_b)
    return merge_math(out_a, lse_a, out_b, lse_b)


def check_merge_inputs(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    """`merge_attention`'s shape checks: ValueError naming the argument."""
    if out_a.shape != out_b.shape or out_a.ndim != 4:
        raise ValueError(
            f"outputs must both be [B, L, H, D], got {tuple(out_a.shape)} and {tuple(out_b.shape)}"
        )
    batch, length, heads, _ = out_a.shape
    for label, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != (batch, heads, length):
            raise ValueError(f"{label} must be [B, H, L] = {(batch, heads, length)}, got {tuple(lse.shape)}")


def merge_math(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """`merge_attention` without its checks (also what `ispa.fused_merge` compiles)."""
    log_a, log_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(log_a, log_b)
    # Where both parts are empty lse is -inf; shifting by 0 there keeps both weights at exactly 0 instead of NaN.
    shift = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(log_a - shift).transpose(1, 2).unsqueeze(-1)  # [B, L, H, 1]
    weight_b = torch.exp(log_b - shift).transpose(1, 2).unsqueeze(-1)
    out = weight_a * out_a.float() + weight_b * out_b.float()
    return out.to(out_a.dtype), lse
