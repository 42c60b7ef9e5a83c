"""A tiny autoregressive block transformer that runs its self-attention through an `AttentionSession`.

It mimics the shape of LiveAvatar's loop at toy size: a sink prefilled once, then blocks of tokens, each processed
once per "denoising step" (one history ring per step), with the next block's input derived from the previous
block's output. Random weights, no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ispa import AttentionSession, BlockReport, CacheLayout, attention_with_lse


@dataclass(frozen=True)
class ToyConfig:
    num_layers: int = 4
    heads: int = 2
    head_dim: int = 8
    sink_tokens: int = 6
    block_tokens: int = 5
    history_blocks: int = 2
    num_rings: int = 2
    frames_per_block: int = 1

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    def layout(self) -> CacheLayout:
        return CacheLayout(self.block_tokens, self.history_blocks, self.num_rings, self.frames_per_block)


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.norm(x)
        batch, length, dim = h.shape
        return tuple(
            proj(h).view(batch, length, self.heads, dim // self.heads) for proj in (self.q, self.k, self.v)
        )


class ToyTransformer(nn.Module):
    def __init__(self, config: ToyConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(ToyBlock(config.dim, config.heads) for _ in range(config.num_layers))
        with torch.no_grad():  # sharper attention than the default init gives, so history matters
            for block in self.blocks:
                block.q.weight.mul_(3.0)
                block.k.weight.mul_(3.0)

    @torch.no_grad()
    def prefill_sink(self, session: AttentionSession, x: Tensor) -> None:
        """Run the sink tokens through every layer (attending among themselves) and store their keys/values."""
        for index, block in enumerate(self.blocks):
            q, k, v = block.qkv(x)
            session.write_sink(index, k, v)
            attended, _ = attention_with_lse(q, k, v)
            x = x + block.o(attended.flatten(-2))
            x = x + block.mlp(x)

    @torch.no_grad()
    def forward_block(self, session: AttentionSession, x: Tensor, ring: int) -> Tensor:
        """One pass of the current block's tokens through all layers; history comes from ring `ring`."""
        for index, block in enumerate(self.blocks):
            q, k, v = block.qkv(x)
            sink_k, sink_v = session.sink(index)
            local_k = torch.cat([sink_k, k], dim=1)
            local_v = torch.cat([sink_v, v], dim=1)
            x = x + session.self_attention(index, q, local_k, local_v, k, v, block.o, ring=ring)
            x = x + block.mlp(x)
        return x


class ToyRun:
    """Streams blocks through a session: its own generator, so two runs with one seed draw the same inputs."""

    def __init__(self, model: ToyTransformer, session: AttentionSession, seed: int, batch: int = 1) -> None:
        self.model = model
        self.session = session
        config = model.config
        self._generator = torch.Generator().manual_seed(seed)
        sink = torch.randn(batch, config.sink_tokens, config.dim, generator=self._generator)
        model.prefill_sink(session, sink)
        self._previous = torch.randn(batch, config.block_tokens, config.dim, generator=self._generator)

    def step(self) -> tuple[list[Tensor], BlockReport]:
        """Generate one block: one forward per ring, then `end_block`. Returns (outputs per ring, report)."""
        outputs = []
        x = self._previous
        for ring in range(self.model.config.num_rings):
            noise = torch.randn(x.shape, generator=self._generator)
            x = self.model.forward_block(self.session, 0.5 * x + noise, ring)
            outputs.append(x)
        self._previous = x
        return outputs, self.session.end_block()
