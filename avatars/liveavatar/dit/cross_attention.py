"""Cross-attention from video tokens to a context (text tokens, or one latent frame's audio tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avatars.liveavatar.dit.layers import AttentionProjections


class CrossAttention(AttentionProjections):
    """Wan's cross-attention: no RoPE, q/k RMS-normalised over all heads, every context token visible."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, Lq, dim] attends to context [B, Lk, dim]; returns [B, Lq, dim]."""
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).unflatten(-1, heads).transpose(1, 2)  # [B, H, Lq, D]
        k = self.norm_k(self.k(context)).unflatten(-1, heads).transpose(1, 2)  # [B, H, Lk, D]
        v = self.v(context).unflatten(-1, heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, Lq, D]
        return self.o(out.transpose(1, 2).flatten(2))
