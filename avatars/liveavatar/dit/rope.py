"""3-axis rotary position embedding (time, height, width), computed from integer positions on the fly.

Wan splits each head's channel pairs between the axes: height and width get `head_dim // 6` pairs each, time
gets the rest (22/21/21 pairs at head_dim 128). Pair p of a token at position (t, h, w) is rotated by
`pos_axis(p) · θ^(-2i/d_axis)` with θ = 10000, i the pair's index inside its axis and d_axis the axis' channel
count. The official code reads these angles from a 45,000-row table (it runs out after ~2 hours of video) and
stores them as complex-half; here they are computed in float64 from the positions, so any position works,
including the negative ones of the motion tokens. The rotation runs in at least fp32 (float64 inputs stay
float64): for bf16 activations its error (~1e-7) is far below bf16 resolution, at half the memory traffic of
the official float64 rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROPE_THETA = 10000.0


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (time, height, width); each is even, and they sum to head_dim."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


@dataclass(frozen=True)
class RotaryAngles:
    """cos/sin of every token's rotation angle per channel pair: [N, head_dim / 2], float64."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __len__(self) -> int:
        return self.cos.shape[0]


def rope_angles(positions: torch.Tensor, head_dim: int) -> RotaryAngles:
    """Angles for tokens at `positions` [N, 3] (time, height, width; any integers, negative allowed)."""
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must be [N, 3] (t, h, w), got {tuple(positions.shape)}")
    pos = positions.to(torch.float64)
    parts = []
    for axis, dim in enumerate(axis_dims(head_dim)):
        exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
        inv_freq = 1.0 / ROPE_THETA**exponents  # [dim / 2]
        parts.append(pos[:, axis : axis + 1] * inv_freq)  # [N, dim / 2]
    angles = torch.cat(parts, dim=1)  # [N, head_dim / 2]
    return RotaryAngles(cos=angles.cos(), sin=angles.sin())


def apply_rope(x: torch.Tensor, angles: RotaryAngles, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate consecutive channel pairs (x[2i], x[2i+1]) of x [B, N, H, D] in ≥ fp32; returns x's dtype.

    With `out` (x's shape, any dtype; e.g. a slice of a preallocated buffer) the result is written there and
    returned, which saves the copy a later concatenation would make.
    """
    if x.shape[1] != len(angles) or x.shape[-1] != 2 * angles.cos.shape[-1]:
        raise ValueError(
            f"x {tuple(x.shape)} does not match RoPE angles for {len(angles)} tokens × "
            f"{angles.cos.shape[-1]} pairs"
        )
    compute = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(compute).unflatten(-1, (-1, 2))  # [B, N, H, D/2, 2]
    real, imag = pairs.unbind(-1)
    cos = angles.cos.to(compute)[:, None, :]  # [N, 1, D/2], broadcast over batch and heads
    sin = angles.sin.to(compute)[:, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2)
    if out is None:
        return rotated.to(x.dtype)
    if out.shape != x.shape:
        raise ValueError(f"out {tuple(out.shape)} must have x's shape {tuple(x.shape)}")
    return out.copy_(rotated)
