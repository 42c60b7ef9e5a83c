"""The VAE's causal decode of one run: warmed on the motion latents, then one block at a time.

Two warm-ups (`DECODER_WARMUPS`): "sink", the default, warms the causal cache on the last 19 motion latents (those
the sink sees); "all" on all 92, which reproduces the official single-GPU decode of the first clip exactly, at
about 5× the warm-up's cost, paid before the first frame of every run. Why the default: docs/performance.md
(`bench/decoder_warmup.py` measures both). The warm-up's frames are not shown. `to_uint8_frames` turns a decoded
block into the frames a chunk carries.
"""

from __future__ import annotations

import time

import torch

from avatars.liveavatar.encoders.vae import MOTION_LATENT_FRAMES, DecoderState, WanVAE

__all__ = ["DECODER_WARMUPS", "DEFAULT_DECODER_WARMUP", "DecoderStage", "to_uint8_frames"]

DECODER_WARMUPS = ("sink", "all")  # the last 19 motion latents, or all 92 (the official first clip)
DEFAULT_DECODER_WARMUP = "sink"


class DecoderStage:
    """One run's decoder: `warm` is a state to start from (an earlier run's warm-up on the same latents, taken
    over) or None; `warmup`: which motion latents warm it (`DECODER_WARMUPS`)."""

    def __init__(
        self,
        vae: WanVAE,
        motion_latents: torch.Tensor,
        warm: DecoderState | None = None,
        warmup: str = DEFAULT_DECODER_WARMUP,
    ) -> None:
        if warmup not in DECODER_WARMUPS:
            raise ValueError(f"decoder warm-up must be one of {', '.join(DECODER_WARMUPS)}, got {warmup!r}")
        self.device = vae.device
        self._decoder = vae.stream_decoder()
        if warm is not None:
            self._decoder.restore(warm)
        else:
            latents = motion_latents if warmup == "all" else motion_latents[:, :, -MOTION_LATENT_FRAMES:]
            self._decoder.decode_block(latents.to(self.device))

    def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(frames [12, H, W, 3] uint8 on the decoder's device, seconds) of the next block."""
        started = time.perf_counter()
        frames = to_uint8_frames(self._decoder.decode_block(latents.to(self.device)))
        return frames, time.perf_counter() - started

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """The causal cache as it stands (made on this thread's stream) is from now on used on `stream`."""
        self._decoder.record_stream(stream)

    def snapshot(self, device: torch.device | None = None) -> DecoderState:
        """A copy of the causal cache (between decodes), on `device` (default: the decoder's)."""
        return self._decoder.snapshot(device)


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, T, H, W] in [-1, 1] → [T, H, W, 3] uint8, on the same device."""
    pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous()
