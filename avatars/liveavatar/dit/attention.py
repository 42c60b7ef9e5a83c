"""The self-attention module and the two ways it is computed.

`SelfAttention` owns the weights (q, k, v, o and the q/k RMSNorms, named as in the checkpoint); the math lives
in small processor objects, as diffusers separates an attention module from its processor:

- `SinkPrefillAttention` — the t=0 pass over the sink tokens (reference frame + motion tokens). The sink
  tokens attend to each other, and their keys (normalised, *without* RoPE) and values are written to the
  session's sink, because the sink is rotated afresh at every later forward (its reference frame moves).
- `StreamingAttention` — a block of noisy tokens. Queries and keys are rotated at the block's absolute
  positions, the sink keys at this forward's sink positions, and the ISPA session attends over [sink; current
  block] plus its history ring, stores the current block, and applies the output projection.

The model holds no cache state: everything that persists lives in the session passed to each call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from avatars.liveavatar.dit.layers import AttentionProjections
from avatars.liveavatar.dit.rope import RotaryAngles, apply_rope
from avatars.liveavatar.fp8_linear import linears_on_shared_input

if TYPE_CHECKING:
    from ispa import AttentionSession


class SelfAttention(AttentionProjections):
    """Projections of one block's self-attention; q/k are RMS-normalised over all heads before the split."""

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (normalised, not rotated) and v, each [B, L, heads, head_dim], from x [B, L, dim]."""
        heads = (self.num_heads, self.head_dim)
        q, k, v = linears_on_shared_input((self.q, self.k, self.v), x)  # FP8: x quantized once for all three
        return (
            self.norm_q(q).unflatten(-1, heads),
            self.norm_k(k).unflatten(-1, heads),
            v.unflatten(-1, heads),
        )

    def project_local(
        self,
        x: torch.Tensor,
        sink_k: torch.Tensor,
        sink_v: torch.Tensor,
        local_k: torch.Tensor,
        local_v: torch.Tensor,
        query_angles: RotaryAngles,
        sink_angles: RotaryAngles,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project a block x [B, L, dim] and fill the local buffers [B, S + L, H, D] in place: the sink keys rotated
        at this forward's sink positions, then the block's rotated keys; values likewise, unrotated (no
        concatenation). Returns the rotated q, and k, v as views of the buffers' block part.

        A method of its own, so that `avatars.liveavatar.compiled` can compile it (norms and RoPE are pointwise)."""
        q, k, v = self.project(x)  # [B, L, H, D]
        sink = sink_k.shape[1]
        apply_rope(sink_k, sink_angles, out=local_k[:, :sink])
        k = apply_rope(k, query_angles, out=local_k[:, sink:])
        local_v[:, :sink].copy_(sink_v)
        v = local_v[:, sink:].copy_(v)
        return apply_rope(q, query_angles), k, v


@dataclass
class SinkPrefillAttention:
    """Processor for the sink prefill: fills the session's sink for `layer` and attends within the sink."""

    session: AttentionSession
    angles: RotaryAngles  # RoPE of the sink tokens at prefill time

    def __call__(self, attn: SelfAttention, x: torch.Tensor, layer: int) -> torch.Tensor:
        # 1. Project; the sink stores keys before RoPE so later forwards can place them anywhere
        q, k, v = attn.project(x)  # [B, S, H, D]
        self.session.write_sink(layer, k, v)
        # 2. Plain attention among the sink tokens at their prefill positions
        q, k = apply_rope(q, self.angles), apply_rope(k, self.angles)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return attn.o(out.transpose(1, 2).flatten(2))  # [B, S, dim]


@dataclass
class StreamingAttention:
    """Processor for a noisy block: attention through the ISPA session (sink + current block + history)."""

    session: AttentionSession
    ring: int  # the denoising step: each step keeps its own history ring
    query_angles: RotaryAngles  # RoPE of the block's tokens
    sink_angles: RotaryAngles  # RoPE of the sink tokens for this forward (rolling reference)

    def __call__(self, attn: SelfAttention, x: torch.Tensor, layer: int) -> torch.Tensor:
        sink_k, sink_v = self.session.sink(layer)  # [B, S, H, D]
        sink = sink_k.shape[1]
        if sink != len(self.sink_angles):
            raise ValueError(
                f"the session's sink holds {sink} tokens but this video size needs "
                f"{len(self.sink_angles)}; prefill the sink with latents of the same size"
            )
        # 1. Project the block and write local = [sink; current] into the session's buffers (see `project_local`)
        local_k, local_v = self.session.local_buffers(sink_k, sink + x.shape[1])
        q, k, v = attn.project_local(x, sink_k, sink_v, local_k, local_v, self.query_angles, self.sink_angles)
        # 2. The session merges in the history of `ring` and stores the current block (by copying it)
        return self.session.self_attention(layer, q, local_k, local_v, k, v, attn.o, ring=self.ring)
