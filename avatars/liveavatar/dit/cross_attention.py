"""Cross-attention from video tokens to a context (text tokens, or one latent frame's audio tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avatars.liveavatar.dit.layers import AttentionProjections


class CrossAttention(AttentionProjections):
    """Wan's cross-attention: no RoPE, q/k RMS-normalised over all heads, every context token visible.

    The context's keys and values depend on the context alone, so a fixed context (the run's prompt) can be
    projected once (`project_context`) and attended to many times (`attend`); see `dit.text_context`.
    """

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, Lk, dim] -> (k, v), each [B, H, Lk, head_dim]."""
        heads = (self.num_heads, self.head_dim)
        k = self.norm_k(self.k(context)).unflatten(-1, heads).transpose(1, 2)
        v = self.v(context).unflatten(-1, heads).transpose(1, 2)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x [B, Lq, dim] attends to projected k/v [B, H, Lk, head_dim]; returns [B, Lq, dim]."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, Lq, D]
        return self.o(out.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, Lq, dim] attends to context [B, Lk, dim]; returns [B, Lq, dim]."""
        return self.attend(x, *self.project_context(context))
