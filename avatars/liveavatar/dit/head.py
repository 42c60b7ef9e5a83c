"""The output head: adaLN modulated by the timestep embedding itself (not its projection), then a linear map
to the patch's latent channels."""

from __future__ import annotations

import torch
from torch import nn

from avatars.liveavatar.dit.layers import layer_norm


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.head = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        """x [B, F·n, dim], time_embedding [B, F, dim] fp32 -> [B, F·n, out_features], computed in fp32."""
        batch, length, dim = x.shape
        frames = time_embedding.shape[1]
        e = (self.modulation.unsqueeze(0) + time_embedding.unsqueeze(2)).unsqueeze(3)  # [B, F, 2, 1, dim]
        shift, scale = e.unbind(2)  # [B, F, 1, dim] each
        h = layer_norm(x, self.eps).view(batch, frames, length // frames, dim) * (1 + scale) + shift
        return self.head(h.flatten(1, 2))
