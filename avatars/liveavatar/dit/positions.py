"""Where each token sits in RoPE space (time, height, width), following LiveAvatar's causal inference.

- Noisy tokens of a block: time = absolute latent-frame index, height/width = the token grid.
- Reference frame (sink): time `30` at prefill; during streaming the reference "rolls" with the video so that
  it stays `ref_shift` latent frames ahead of the current block once the video is long enough:
  `30 + max(0, frame_index − (30 − ref_shift))` (LiveAvatar draws ref_shift from randint(4, 30) per forward).
- FramePack motion tokens (sink): fixed negative times, with the compressed buckets' spatial indices stretched
  over the full token grid (np.linspace, truncated), exactly as Wan's `rope_precompute` places them.

Given a `device`, positions are built there: the block and reference grids from `arange` (no host-to-device copy,
which on CUDA would wait for all queued work), the motion grid copied once per size and device and then reused.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

REF_BASE_TIME = 30
# FramePack buckets in token order (newest first): (latent frames, temporal and spatial compression).
FRAMEPACK_BUCKETS = ((1, 1), (2, 2), (16, 4))
FRAMEPACK_FRAMES = sum(frames for frames, _ in FRAMEPACK_BUCKETS)  # 19 latent frames of motion context


def grid_positions(times: list[int], rows: list[int], cols: list[int]) -> torch.Tensor:
    """All (t, h, w) combinations in raster order (time slowest), as a [N, 3] int64 tensor."""
    t, h, w = torch.meshgrid(
        torch.tensor(times, dtype=torch.long),
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(cols, dtype=torch.long),
        indexing="ij",
    )
    return torch.stack((t, h, w), dim=-1).reshape(-1, 3)


def _arange_grid(
    first_time: int, times: int, height: int, width: int, device: torch.device | None
) -> torch.Tensor:
    """`grid_positions` of consecutive times and the full height×width grid, built on `device`."""
    t, h, w = torch.meshgrid(
        torch.arange(first_time, first_time + times, device=device),
        torch.arange(height, device=device),
        torch.arange(width, device=device),
        indexing="ij",
    )
    return torch.stack((t, h, w), dim=-1).reshape(-1, 3)


def block_positions(
    frame_index: int, frames: int, height: int, width: int, device: torch.device | None = None
) -> torch.Tensor:
    """Positions of a block's noisy tokens: `frames` latent frames from `frame_index`, height×width grid."""
    return _arange_grid(frame_index, frames, height, width, device)


def ref_time(frame_index: int, ref_shift: int) -> int:
    """Temporal RoPE index of the reference frame while generating the block that starts at `frame_index`."""
    return REF_BASE_TIME + max(0, frame_index - (REF_BASE_TIME - ref_shift))


def _stretched(count: int, span: int) -> list[int]:
    """`count` indices spread over [0, span − 1] as Wan places compressed tokens (linspace, truncated)."""
    return np.linspace(0, span - 1, count).astype(int).tolist()


def motion_positions(height: int, width: int) -> torch.Tensor:
    """Positions of the FramePack motion tokens for a height×width token grid, newest bucket first.

    A bucket of n latent frames compressed c× in time and space yields n/c frames of (height/c)×(width/c)
    tokens; its times are −linspace(end, end − n + 1, n/c) where `end` counts the frames up to and including
    the bucket (−1; −3; −19, −14, −9, −4 for buckets 1, 2, 16).
    """
    groups = []
    end = 0
    for frames, factor in FRAMEPACK_BUCKETS:
        end += frames
        times = (-np.linspace(end, end - frames + 1, frames // factor).astype(int)).tolist()
        groups.append(
            grid_positions(times, _stretched(height // factor, height), _stretched(width // factor, width))
        )
    return torch.cat(groups)


@lru_cache(maxsize=16)
def _motion_positions_on(height: int, width: int, device: torch.device) -> torch.Tensor:
    # Shared between calls: callers only read it (sink_positions concatenates it into a new tensor).
    return motion_positions(height, width).to(device)


def sink_positions(
    height: int, width: int, reference_time: int, device: torch.device | None = None
) -> torch.Tensor:
    """Positions of the sink tokens: the reference frame's grid at `reference_time`, then motion tokens."""
    ref = _arange_grid(reference_time, 1, height, width, device)
    motion = _motion_positions_on(
        height, width, torch.device("cpu") if device is None else torch.device(device)
    )
    return torch.cat((ref, motion))


def motion_token_count(height: int, width: int) -> int:
    """Number of FramePack motion tokens for a token grid height×width (1584 at 24×44)."""
    return sum(
        (frames // factor) * (height // factor) * (width // factor) for frames, factor in FRAMEPACK_BUCKETS
    )
