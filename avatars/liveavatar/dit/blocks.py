"""One DiT block: adaLN-modulated self-attention, text cross-attention, adaLN-modulated GELU feed-forward."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from avatars.liveavatar.dit.attention import SelfAttention
from avatars.liveavatar.dit.cross_attention import CrossAttention
from avatars.liveavatar.dit.layers import layer_norm
from avatars.liveavatar.dit.text_context import TextContext

# Computes self-attention for the block's normalised tokens: (module, x [B, L, dim]) -> [B, L, dim].
SelfAttentionFn = Callable[[SelfAttention, torch.Tensor], torch.Tensor]


class TransformerBlock(nn.Module):
    """A Wan block whose modulation is given per *group* of tokens (one group per latent frame).

    The six modulation vectors (shift, scale, gate for attention; shift, scale, gate for the FFN) are the
    block's learned `modulation` plus the timestep projection. Noisy tokens get one set per latent frame; the
    sink tokens get the zero-timestep set as a single group. The residual stream is carried in fp32 inside the
    block and returned in the input dtype, as in the official code.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        context: TextContext,
        self_attention: SelfAttentionFn,
    ) -> torch.Tensor:
        """x [B, G·n, dim] (G groups of n tokens, group-major); modulation [B, G, 6, dim] fp32;
        context: the run's text context (its K/V are projected once per block and run). Returns [B, G·n, dim]
        in x's dtype."""
        batch, length, dim = x.shape
        groups = modulation.shape[1]
        e = (self.modulation.float().unsqueeze(0) + modulation).unsqueeze(3)  # [B, G, 6, 1, dim]
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = e.unbind(2)  # each [B, G, 1, dim]

        def grouped(t: torch.Tensor) -> torch.Tensor:  # [B, G·n, dim] -> [B, G, n, dim]
            return t.view(batch, groups, length // groups, dim)

        # 1. Self-attention
        h = grouped(layer_norm(x, self.eps)) * (1 + scale_msa) + shift_msa
        y = self_attention(self.self_attn, h.flatten(1, 2).to(x.dtype))
        residual = x.float() + (grouped(y.float()) * gate_msa).flatten(1, 2)

        # 2. Cross-attention to the text
        text_kv = context.kv(self.cross_attn, x.shape[0])
        residual = residual + self.cross_attn.attend(self.norm3(residual.to(x.dtype)), *text_kv).float()

        # 3. Feed-forward
        h = grouped(layer_norm(residual, self.eps)) * (1 + scale_ffn) + shift_ffn
        y = self.ffn(h.flatten(1, 2).to(x.dtype))
        residual = residual + (grouped(y.float()) * gate_ffn).flatten(1, 2)
        return residual.to(x.dtype)
