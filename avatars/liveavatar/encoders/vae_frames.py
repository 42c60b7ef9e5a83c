"""One latent frame through the Wan2.1 decoder, with its full-resolution stages run a few output frames at a time.

diffusers' `WanDecoder3d.forward` runs each latent frame's 4 output frames through every stage at once; at
704×384 its largest moment, an fp32 RMS norm over 4 frames of 96 channels at full resolution, puts 1.37 GiB of
transient tensors on top of the decoder cache (measured on live tensors, `bench/memory_transients.py`). After the
last temporal upsampling no stage mixes frames except through its causal convolutions, which read the frames
before from their cache exactly as when a latent frame is fed alone; so those stages can take the frames in
passes of `frames_per_pass`, with each pass starting from the same cache slot, and the video is the same
(tests/avatars/test_encoders_vae.py compares it with diffusers' own `decode`).

The walk follows `WanDecoder3d.forward` of diffusers 0.42.1 (pinned in requirements.txt): conv_in, the middle
block, the up blocks, then norm, SiLU and conv_out.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T, WanDecoder3d

__all__ = ["decode_latent_frame", "first_frame_wise_up_block"]


def first_frame_wise_up_block(decoder: WanDecoder3d) -> int:
    """Index of the first up block after the last temporal upsampling: from there on frames can be split."""
    temporal = [
        i
        for i, block in enumerate(decoder.up_blocks)
        if block.upsamplers is not None and block.upsamplers[0].mode == "upsample3d"
    ]
    return temporal[-1] + 1 if temporal else 0


def _cached_conv(conv, x: torch.Tensor, cache: list, index: list[int]) -> torch.Tensor:
    """A causal conv that reads its last input frames from `cache` and leaves this call's there (diffusers' rule)."""
    slot = index[0]
    carried = x[:, :, -CACHE_T:].clone()
    if carried.shape[2] < CACHE_T and cache[slot] is not None:
        carried = torch.cat([cache[slot][:, :, -1:].to(carried.device), carried], dim=2)
    out = conv(x, cache[slot])
    cache[slot] = carried
    index[0] += 1
    return out


def decode_latent_frame(
    decoder: WanDecoder3d, x: torch.Tensor, cache: list, frames_per_pass: int | None, first_chunk: bool
) -> torch.Tensor:
    """One latent frame [B, z, 1, h, w] (after post_quant_conv) → its output frames, updating `cache`.

    `frames_per_pass`: output frames per pass through the stages after the last temporal upsampling; None runs
    them all at once (diffusers' own forward).
    """
    if frames_per_pass is None:
        return decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first_chunk)
    index = [0]
    x = _cached_conv(decoder.conv_in, x, cache, index)
    x = decoder.mid_block(x, feat_cache=cache, feat_idx=index)
    split = first_frame_wise_up_block(decoder)
    for block in decoder.up_blocks[:split]:
        x = block(x, feat_cache=cache, feat_idx=index, first_chunk=first_chunk)
    start = index[0]
    passes = []
    for part in x.split(frames_per_pass, dim=2):
        index[0] = start
        for block in decoder.up_blocks[split:]:
            part = block(part, feat_cache=cache, feat_idx=index, first_chunk=first_chunk)
        part = decoder.nonlinearity(decoder.norm_out(part))
        passes.append(_cached_conv(decoder.conv_out, part, cache, index))
    return torch.cat(passes, dim=2) if len(passes) > 1 else passes[0]
