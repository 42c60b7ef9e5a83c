"""A 2-bit KV codec in the manner of Quant VideoGen (QVG): semantic-aware smoothing, then progressive residual
quantization.

Per (batch, head), one block's tokens are grouped by k-means on the tensor being stored (keys for keys, values for
values); each group's centroid is kept in fp16 and subtracted, so what is left is small and centred (tokens of the
same region of the picture land in the same group). That residual is then quantized in stages of one bit each, coarse
to fine: stage s keeps the sign of what the previous stages left and one fp16 magnitude per (head, channel), the
mean absolute residual over the block (the scale that minimises the squared error of a sign code). Two stages give
two bits per value, four values per byte.

Stored per block [B, T, H, D]: the 2-bit codes, each token's group (4 bits, two tokens per byte), the centroids
(fp16, [B*H, C, D]) and the stage scales (fp16, [stages, B*H, 1, D]). The number of groups grows with the tokens
stored at once (one per `tokens_per_cluster`, at most 16), so a small chunk (the sink of a tiny model, a residual
window) does not pay for centroids it cannot use.

Error bound, per (head, channel) of a block: with M₁ the largest |residual| after the centroid, a stage with scale
a leaves at most M_{s+1} = max(M_s − a_s, a_s) (a value above the scale loses a_s, one below it can overshoot by at
most a_s). The decoded value is within M_{stages+1} of the input (plus float32 rounding of the sums).

What is not QVG's: QVG's kernels, its group sizes and its stage count are its own; this is a readable CPU/GPU
reference in PyTorch ops, with no fused kernel (its GPU cost is not measured).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ispa.kv_codecs import BlockCodec

__all__ = ["Q2Codec"]

MAX_CLUSTERS = 16  # a group index fits in 4 bits
STAGES = 2  # one bit per stage: two bits per value


def _nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid for every row: x [N, T, D], centroids [N, C, D] -> [N, T] int64."""
    distance = (centroids * centroids).sum(-1).unsqueeze(1) - 2 * x @ centroids.transpose(1, 2)
    return distance.argmin(-1)


def farthest_points(x: Tensor, clusters: int) -> Tensor:
    """Deterministic seeds for k-means: the first token, then each time the token farthest from the seeds so far
    (every well-separated region gets a seed, where evenly spaced tokens can miss one). [N, T, D] -> [N, C, D]."""
    rows = torch.arange(x.shape[0], device=x.device)
    seeds = [x[:, 0]]
    nearest = ((x - seeds[0].unsqueeze(1)) ** 2).sum(-1)
    for _ in range(clusters - 1):
        seeds.append(x[rows, nearest.argmax(-1)])
        nearest = torch.minimum(nearest, ((x - seeds[-1].unsqueeze(1)) ** 2).sum(-1))
    return torch.stack(seeds, dim=1)


def kmeans(x: Tensor, clusters: int, iterations: int) -> Tensor:
    """Lloyd's k-means on each of the N sets of T points [N, T, D] (float32), from `farthest_points`; a group that
    loses all its points keeps its centroid. Returns the centroids [N, C, D]."""
    centroids = farthest_points(x, clusters)
    for _ in range(iterations):
        assign = _nearest(x, centroids)
        sums = torch.zeros_like(centroids).scatter_add_(1, assign.unsqueeze(-1).expand_as(x), x)
        counts = torch.zeros(centroids.shape[:2], device=x.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=x.dtype)
        )
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centroids)
    return centroids


class Q2Codec(BlockCodec):
    """k-means smoothing per (batch, head), then two one-bit residual stages with per-channel fp16 scales."""

    def __init__(
        self, *, tokens_per_cluster: int = 48, max_clusters: int = MAX_CLUSTERS, iterations: int = 4
    ) -> None:
        if not 1 <= max_clusters <= MAX_CLUSTERS:
            raise ValueError(f"Q2Codec max_clusters must be in [1, {MAX_CLUSTERS}], got {max_clusters!r}")
        for name, value in (("tokens_per_cluster", tokens_per_cluster), ("iterations", iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Q2Codec {name} must be a positive int, got {value!r}")
        self.stages = STAGES
        self.tokens_per_cluster = tokens_per_cluster
        self.max_clusters = max_clusters
        self.iterations = iterations
        self.name = "q2"

    def clusters(self, tokens: int) -> int:
        """Groups used for a chunk of `tokens` tokens."""
        return max(1, min(self.max_clusters, tokens // self.tokens_per_cluster))

    def check_block(self, tokens: int, head_dim: int) -> None:
        if head_dim % 4:
            raise ValueError(f"q2 KV packs four values per byte: head_dim must divide by 4, got {head_dim}")

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        batch, tokens, heads, dim = x.shape
        self.check_block(tokens, dim)
        rows = x.float().permute(0, 2, 1, 3).reshape(batch * heads, tokens, dim)
        centroids = kmeans(rows, self.clusters(tokens), self.iterations).half()
        # Assign and subtract against the stored (fp16) centroids, so decoding starts from exactly these.
        assign = _nearest(rows, centroids.float())
        residual = rows - torch.gather(centroids.float(), 1, assign.unsqueeze(-1).expand_as(rows))
        levels = torch.zeros(rows.shape, dtype=torch.uint8, device=x.device)
        scales = []
        for stage in range(self.stages):
            scale = residual.abs().mean(dim=1, keepdim=True).half()
            positive = residual >= 0
            residual -= torch.where(positive, scale.float(), -scale.float())
            levels |= positive.to(torch.uint8) << stage
            scales.append(scale)
        codes = levels[..., 0::4] | levels[..., 1::4] << 2 | levels[..., 2::4] << 4 | levels[..., 3::4] << 6
        index = assign.to(torch.uint8)
        if tokens % 2:
            index = torch.cat([index, index.new_zeros(index.shape[0], 1)], dim=1)
        index = index[:, 0::2] | index[:, 1::2] << 4
        return codes.contiguous(), index.contiguous(), centroids, torch.stack(scales)

    def decode_into(self, stored: tuple[Tensor, ...], out: Tensor) -> None:
        codes, index, centroids, scales = stored
        batch, tokens, heads, dim = out.shape
        assign = torch.stack([index & 0x0F, index >> 4], dim=-1).flatten(1)[:, :tokens].long()
        values = torch.gather(centroids.float(), 1, assign.unsqueeze(-1).expand(-1, -1, dim))
        levels = torch.stack([codes >> shift & 0x03 for shift in (0, 2, 4, 6)], dim=-1).flatten(-2)
        for stage in range(self.stages):
            sign = ((levels >> stage & 1).float() * 2 - 1).mul_(scales[stage].float())
            values += sign
        out.copy_(values.view(batch, heads, tokens, dim).transpose(1, 2))

    def block_nbytes(self, batch: int, tokens: int, heads: int, head_dim: int) -> int:
        rows = batch * heads
        codes = rows * tokens * head_dim // 4
        index = rows * ((tokens + 1) // 2)
        centroids = rows * self.clusters(tokens) * head_dim * 2
        scales = self.stages * rows * head_dim * 2
        return codes + index + centroids + scales
