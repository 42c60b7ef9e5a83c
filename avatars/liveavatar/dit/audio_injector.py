"""Audio injection after selected blocks: per latent frame, AdaLN on the global audio token, then
cross-attention to that frame's audio tokens, added back to the noisy tokens (`audio_injector` in the
checkpoint)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avatars.liveavatar.dit.audio_encoder import AudioTokens
from avatars.liveavatar.dit.cross_attention import CrossAttention
from avatars.liveavatar.dit.layers import layer_norm


class AdaLayerNorm(nn.Module):
    """LayerNorm (no affine, eps 1e-5) shifted and scaled by Linear(SiLU(condition)), as diffusers'
    AdaLayerNorm with chunk_dim=1 (shift first, then scale)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """x [N, n, dim], condition [N, dim] -> [N, n, dim] in x's dtype."""
        shift, scale = (
            self.linear(F.silu(condition)).float().unsqueeze(1).chunk(2, dim=-1)
        )  # [N, 1, dim] each
        return (layer_norm(x, 1e-5) * (1 + scale) + shift).to(x.dtype)


class AudioInjector(nn.Module):
    """One AdaLN + cross-attention pair per injection point (index i serves the i-th injected block)."""

    def __init__(self, dim: int, num_heads: int, num_injections: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.injector = nn.ModuleList(CrossAttention(dim, num_heads, eps) for _ in range(num_injections))
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(dim) for _ in range(num_injections))

    def forward(self, index: int, x: torch.Tensor, audio: AudioTokens) -> torch.Tensor:
        """x [B, F·n, dim] noisy tokens (frame-major), audio for the same F latent frames -> updated x."""
        batch, length, dim = x.shape
        frames = audio.tokens.shape[1]
        # 1. One attention problem per latent frame: its n tokens query its audio tokens
        per_frame = x.reshape(batch * frames, length // frames, dim)  # [B·F, n, dim]
        condition = audio.global_token.reshape(batch * frames, dim).to(x.dtype)  # [B·F, dim]
        context = audio.tokens.flatten(0, 1).to(x.dtype)  # [B·F, num_audio_token + 1, dim]
        # 2. AdaLN on the global token, cross-attention to the local tokens, residual
        query = self.injector_adain_layers[index](per_frame, condition)
        residual = self.injector[index](query, context)  # [B·F, n, dim]
        return x + residual.reshape(batch, length, dim)
