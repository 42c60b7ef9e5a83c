"""How LiveAvatar's streaming loop cuts a video into blocks, and the KV layout that follows from it.

One place for these numbers, read by the streaming loop, the memory plan and the benchmarks alike, so that a plan
can never describe a different run than the one that happens.
"""

from __future__ import annotations

from ispa import CacheLayout

FPS = 25
LATENT_FRAMES_PER_BLOCK = 3
VIDEO_FRAMES_PER_BLOCK = 12  # the Wan VAE's 4× temporal upsampling of one block's 3 latent frames
BLOCKS_PER_CLIP = 4  # the official noise is drawn per clip of 12 latent frames
HISTORY_BLOCKS = 3  # the ring window: the current block plus the 3 before it (12 latent frames)
DENOISING_STEPS = 4  # one KV ring per denoising step, as the official single-GPU loop keeps them
DROPPED_FIRST_FRAMES = 3  # the official pipeline cuts the first 3 frames of the video


def cache_layout(tokens_per_frame: int, steps: int = DENOISING_STEPS) -> CacheLayout:
    """The engine's KV layout for latent frames of `tokens_per_frame` tokens (1,056 at 704×384), one history ring
    per denoising step."""
    return CacheLayout(
        block_tokens=LATENT_FRAMES_PER_BLOCK * tokens_per_frame,
        history_blocks=HISTORY_BLOCKS,
        num_rings=steps,
        frames_per_block=LATENT_FRAMES_PER_BLOCK,
    )
