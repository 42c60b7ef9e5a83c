"""Small layers shared by the DiT's modules: RMSNorm, parameter-free LayerNorm, timestep features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned scale (Wan normalises q/k over all heads at once)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters, computed in fp32 (the result is fp32: it is modulated next)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def sinusoidal_embedding(dim: int, timesteps: torch.Tensor) -> torch.Tensor:
    """Wan's timestep features [N, dim] = [cos(t·f), sin(t·f)], f = 10000^(−i/(dim/2)), in float64."""
    half = dim // 2
    t = timesteps.reshape(-1).to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = torch.outer(t, freqs)
    return torch.cat((args.cos(), args.sin()), dim=1)


class AttentionProjections(nn.Module):
    """Wan's attention parameters: q, k, v, o projections, q/k RMS-normalised over all heads before the split."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
