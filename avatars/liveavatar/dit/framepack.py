"""FramePack motion tokens: the last 19 latent frames of motion, compressed more the older they are."""

from __future__ import annotations

import torch
from torch import nn

from avatars.liveavatar.dit.positions import FRAMEPACK_BUCKETS, FRAMEPACK_FRAMES


class FramePackMotioner(nn.Module):
    """`frame_packer`: the newest latent frame at full token resolution (`proj`, like the patch embedding),
    the two before it 2× compressed in time and space (`proj_2x`), the 16 before those 4× (`proj_4x`)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        convs = []
        for _, factor in FRAMEPACK_BUCKETS:
            kernel = (factor, 2 * factor, 2 * factor)
            convs.append(nn.Conv3d(in_dim, dim, kernel_size=kernel, stride=kernel))
        self.proj, self.proj_2x, self.proj_4x = convs

    def forward(self, motion_latents: torch.Tensor) -> torch.Tensor:
        """motion_latents [B, C, T, h, w] (oldest first, T ≥ 1) -> tokens [B, N_motion, dim], newest first.

        Only the newest 19 frames are used; fewer are zero-padded on the old side (the official "padd" mode).
        """
        batch, channels, frames, height, width = motion_latents.shape
        # 1. Exactly FRAMEPACK_FRAMES frames, right-aligned
        padded = motion_latents.new_zeros(batch, channels, FRAMEPACK_FRAMES, height, width)
        kept = min(frames, FRAMEPACK_FRAMES)
        padded[:, :, FRAMEPACK_FRAMES - kept :] = motion_latents[:, :, frames - kept :]
        # 2. Split into the buckets (oldest first in time), then patchify each with its own conv, newest first
        sizes = [bucket_frames for bucket_frames, _ in FRAMEPACK_BUCKETS]
        newest_first = padded.split(sizes[::-1], dim=2)[::-1]
        tokens = [
            conv(bucket).flatten(2).transpose(1, 2)  # [B, n_i, dim]
            for conv, bucket in zip((self.proj, self.proj_2x, self.proj_4x), newest_first, strict=True)
        ]
        return torch.cat(tokens, dim=1)
