"""The plan's measured transients at real size, counted on live tensors on `meta` (no GPU, no weights): one block's
VAE decode above the decoder cache (Wan2.1 config, frames per pass 1 and all at once) and one 14B layer's absorb
solve (the lean solve and the plain one it replaced).

    python -m bench.memory_transients --size 704x384
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKLWan

from avatars.liveavatar.encoders.vae import WanVAE
from bench.live_tensors import LiveTensorPeak
from ispa.absorption import AbsorptionStats, solve_layer
from ispa.lean_solve import solve_layer_lean

GIB = 2**30


def vae_block_transient(height: int, width: int, frames_per_pass: int | None) -> int:
    with torch.device("meta"):
        vae = WanVAE(AutoencoderKLWan().to(torch.bfloat16))
    vae.latents_mean, vae.inv_latents_std = vae.latents_mean.to("meta"), vae.inv_latents_std.to("meta")
    decoder = vae.stream_decoder(frames_per_pass)
    decoder.decode_block(torch.zeros(1, 16, 2, height // 8, width // 8, device="meta"))
    with LiveTensorPeak() as live:
        live.hold(decoder._cache)
        held = live.live
        decoder.decode_block(torch.zeros(1, 16, 3, height // 8, width // 8, device="meta"))
    return live.peak - held


def solve_peaks(dim: int = 5120) -> tuple[int, int]:
    stats = AbsorptionStats(2, dim, "meta")
    weight = torch.empty(dim, dim, device="meta", dtype=torch.bfloat16)
    tokens = torch.empty(8, dim, device="meta")
    stats.update(0, tokens, tokens, weight)
    with LiveTensorPeak() as plain:
        solve_layer(stats.G(0), stats.C(0), stats.s(0), weight, 1e-3)
    with LiveTensorPeak() as lean:
        solve_layer_lean(stats, 0, weight, 1e-3)
    return plain.peak, lean.peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="704x384", help="HEIGHTxWIDTH")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    for frames_per_pass in (None, 1):
        peak = vae_block_transient(height, width, frames_per_pass)
        print(
            f"VAE decode of a block above its cache, frames per pass {frames_per_pass}: {peak / GIB:.3f} GiB "
            f"({peak / (height * width):.1f} B/pixel)"
        )
    plain, lean = solve_peaks()
    print(
        f"absorb solve of one 14B layer: plain {plain / GIB:.3f} GiB ({plain / 5120**2:.1f} D²), "
        f"lean {lean / GIB:.3f} GiB ({lean / 5120**2:.1f} D²)"
    )


if __name__ == "__main__":
    main()
