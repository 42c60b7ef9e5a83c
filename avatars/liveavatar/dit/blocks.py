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
        in x's dtype.

        The two pointwise-heavy regions around the self-attention call are methods of their own, so that
        `avatars.liveavatar.compiled` can compile them while the attention (the ISPA session) stays eager."""
        h = self.attention_input(x, modulation)
        y = self_attention(self.self_attn, h)
        return self.after_attention(x, y, modulation, *context.kv(self.cross_attn, x.shape[0]))

    def _modulation(self, modulation: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift, scale, gate for attention, then for the FFN: each [B, G, 1, dim] fp32."""
        return (self.modulation.float().unsqueeze(0) + modulation).unsqueeze(3).unbind(2)

    def attention_input(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """1. The normalised, modulated tokens the self-attention takes: [B, G·n, dim] in x's dtype."""
        batch, length, dim = x.shape
        shift_msa, scale_msa = self._modulation(modulation)[:2]
        h = layer_norm(x, self.eps).view(batch, modulation.shape[1], length // modulation.shape[1], dim)
        return (h * (1 + scale_msa) + shift_msa).flatten(1, 2).to(x.dtype)

    def after_attention(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        modulation: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
    ) -> torch.Tensor:
        """2.-3. Gated residual of the self-attention output y [B, G·n, dim], cross-attention to the text's
        projected K/V [B, H, text_len, head_dim], gated feed-forward. Returns [B, G·n, dim] in x's dtype."""
        batch, length, dim = x.shape
        groups = modulation.shape[1]
        _, _, gate_msa, shift_ffn, scale_ffn, gate_ffn = self._modulation(modulation)

        def grouped(t: torch.Tensor) -> torch.Tensor:  # [B, G·n, dim] -> [B, G, n, dim]
            return t.view(batch, groups, length // groups, dim)

        # 2. Self-attention residual, then cross-attention to the text
        residual = x.float() + (grouped(y.float()) * gate_msa).flatten(1, 2)
        residual = residual + self.cross_attn.attend(self.norm3(residual.to(x.dtype)), text_k, text_v).float()

        # 3. Feed-forward
        h = grouped(layer_norm(residual, self.eps)) * (1 + scale_ffn) + shift_ffn
        y = self.ffn(h.flatten(1, 2).to(x.dtype))
        residual = residual + (grouped(y.float()) * gate_ffn).flatten(1, 2)
        return residual.to(x.dtype)
