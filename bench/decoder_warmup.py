"""The two decoder warm-ups on the CPU: time, and how far clip 0's frames are from the official decode (warmed on
all 92 motion latents) when warmed on the last 19. Random-weight Wan2.1-layout VAE (tiny width), a random portrait.

    python -m bench.decoder_warmup
"""

from __future__ import annotations

import time

import numpy as np
import torch

from avatars.liveavatar.encoders.tiny import tiny_vae
from avatars.liveavatar.encoders.vae import WanVAE
from avatars.liveavatar.streaming.decoding import DECODER_WARMUPS, DecoderStage


def main() -> None:
    vae = WanVAE(tiny_vae(0))
    portrait = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    motion = vae.encode_motion(portrait)
    clip = torch.randn(1, 16, 12, 4, 4, generator=torch.Generator().manual_seed(1))  # 4 blocks: clip 0
    decoded = {}
    for warmup in DECODER_WARMUPS:
        started = time.perf_counter()
        stage = DecoderStage(vae, motion, warmup=warmup)
        warm_s = time.perf_counter() - started
        decoded[warmup] = [stage._decoder.decode_block(clip[:, :, i : i + 3]) for i in range(0, 12, 3)]
        print(f"{warmup}: warm-up {warm_s:.2f} s (CPU)")
    for block, (sink, full) in enumerate(zip(decoded["sink"], decoded["all"], strict=True)):
        print(f"block {block}: rel. difference sink vs all {((sink - full).norm() / full.norm()).item():.2e}")


if __name__ == "__main__":
    main()
