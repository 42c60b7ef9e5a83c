"""Token-granular history for the budgeted policies (Window, Salience): the kept tokens of one layer's ring.

Keys and values are stored [B, n, H, D] in the model's dtype, oldest first. With `per_head` scores (Salience) each
head keeps its own tokens: position i of head h is that head's i-th kept token, which attention allows because
the keys carry their rotary positions already and heads never mix. Scores are the accumulated attention mass
[B, n, H] in fp32 and are counted in the bytes, so a budget in bytes buys slightly fewer tokens than without them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TokenHistory", "key_attention_mass"]

_LOGITS_PER_CHUNK = 1 << 24  # fp32 logits materialised at once (64 MiB)


def key_attention_mass(q: Tensor, k: Tensor, lse: Tensor, scale: float | None = None) -> Tensor:
    """Attention mass each key receives, summed over the queries: Σ_i exp(scale · q_i·k_j − lse_i), per head.

    q : [B, Lq, H, D]; k : [B, Lk, H, D]; lse : [B, H, Lq], the natural-log LSE of the attention these keys are a
    part of (the fused LSE of local + history), so the result is each key's share of the real softmax without a
    second softmax. Returns [B, Lk, H] fp32. Queries are taken in chunks so that the logits stay bounded.
    """
    batch, num_queries, heads, head_dim = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    mass = torch.zeros((batch, heads, k.shape[1]), dtype=torch.float32, device=q.device)
    if k.shape[1] == 0 or num_queries == 0:
        return mass.transpose(1, 2)
    keys = k.float().transpose(1, 2).transpose(-1, -2)  # [B, H, D, Lk]
    chunk = max(1, _LOGITS_PER_CHUNK // max(1, batch * heads * k.shape[1]))
    for start in range(0, num_queries, chunk):
        queries = q[:, start : start + chunk].float().transpose(1, 2) * scale  # [B, H, c, D]
        logits = torch.matmul(queries, keys)  # [B, H, c, Lk]
        logits.sub_(lse[:, :, start : start + chunk].float().unsqueeze(-1)).exp_()  # in place: memory-bound
        mass += logits.sum(dim=2)
    return mass.transpose(1, 2)


class TokenHistory:
    """The kept history tokens of one layer and ring, oldest first, and their scores (None for Window)."""

    def __init__(self, k: Tensor, v: Tensor, scores: Tensor | None = None) -> None:
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must both be [B, L, H, D], got {tuple(k.shape)} and {tuple(v.shape)}")
        if scores is not None and scores.shape != k.shape[:3]:
            raise ValueError(f"scores must be [B, L, H] = {tuple(k.shape[:3])}, got {tuple(scores.shape)}")
        self.k, self.v, self.scores = k, v, scores

    @property
    def tokens(self) -> int:
        return self.k.shape[1]

    def bytes_per_token(self) -> int:
        """Bytes of one kept token: key, value and (with scores) its fp32 score per head."""
        batch, _, heads, head_dim = self.k.shape
        score = 0 if self.scores is None else batch * heads * 4
        return 2 * batch * heads * head_dim * self.k.element_size() + score

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + (0 if self.scores is None else self.scores.nbytes)

    def add_mass(self, mass: Tensor) -> None:
        """Accumulate the mass [B, tokens, H] the kept tokens received in one forward."""
        if self.scores is not None:
            self.scores += mass

    def extend(self, k: Tensor, v: Tensor, scores: Tensor | None) -> None:
        """Append newer tokens (and their initial scores, with scores kept)."""
        self.k = torch.cat([self.k, k], dim=1)
        self.v = torch.cat([self.v, v], dim=1)
        if self.scores is not None:
            self.scores = torch.cat([self.scores, scores], dim=1)

    def keep(self, tokens: int) -> None:
        """Keep `tokens` per head: the newest without scores, the largest scores with them (in their order)."""
        tokens = max(0, min(tokens, self.tokens))
        if tokens == self.tokens:
            return
        if self.scores is None:
            start = self.tokens - tokens
            self.k, self.v = self.k[:, start:].clone(), self.v[:, start:].clone()
            return
        chosen = torch.topk(self.scores, tokens, dim=1).indices.sort(dim=1).values  # [B, tokens, H]
        index = chosen.unsqueeze(-1).expand(-1, -1, -1, self.k.shape[-1])
        self.k = torch.gather(self.k, 1, index)
        self.v = torch.gather(self.v, 1, index)
        self.scores = torch.gather(self.scores, 1, chosen)
