"""The plan's two measured transients against live tensors: one block's VAE decode (real config on `meta`) and the
absorb's solve (a real-size layer on `meta`, and at a small size on the CPU against the solve it replaces)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from avatars.liveavatar.encoders.vae import WanVAE
from avatars.liveavatar.memory_plan import terms as memory
from avatars.liveavatar.memory_plan.plan import ABSORB_WORKSPACE_BYTES_PER_DIM2
from bench.live_tensors import LiveTensorPeak
from ispa.absorption import AbsorptionStats, solve_layer
from ispa.lean_solve import solve_layer_lean


@pytest.fixture(scope="module")
def meta_vae():
    with torch.device("meta"):
        vae = WanVAE(AutoencoderKLWan().to(torch.bfloat16))  # the Wan2.1 architecture
    vae.latents_mean, vae.inv_latents_std = vae.latents_mean.to("meta"), vae.inv_latents_std.to("meta")
    return vae


def _decode_transient(vae: WanVAE, frames_per_pass: int | None, latent_frames: int = 3) -> int:
    decoder = vae.stream_decoder(frames_per_pass)
    decoder.decode_block(torch.zeros(1, 16, 2, 8, 8, device="meta"))  # a 64×64 video, cache full
    with LiveTensorPeak() as live:
        live.hold(decoder._cache)  # the cache is replaced as the decode goes: counted until it is dropped
        held = live.live
        decoder.decode_block(torch.zeros(1, 16, latent_frames, 8, 8, device="meta"))  # 3: one block
    assert held == memory.VAE_DECODER_CACHE_BYTES_PER_PIXEL * 64 * 64
    return live.peak - held


def test_vae_decode_transient_is_the_planned_one_and_a_quarter_of_diffusers_way(meta_vae):
    frame_wise = _decode_transient(meta_vae, 1)
    assert frame_wise <= memory.vae_decode_activation_bytes(64, 64) < frame_wise + 64 * 64  # rounded up
    all_at_once = _decode_transient(meta_vae, None, latent_frames=1)  # each latent frame peaks alike
    assert all_at_once > 2 * frame_wise


def _stats(dim: int, device: str) -> tuple[AbsorptionStats, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    stats = AbsorptionStats(2, dim, device)
    weight = torch.randn(dim, dim, generator=gen).to(device=device, dtype=torch.bfloat16)
    for layer in range(2):
        local = torch.randn(4 * dim, dim, generator=gen).to(device)
        stats.update(
            layer,
            local * (layer + 1),
            local + 0.1 * torch.randn(local.shape, generator=gen).to(device),
            weight,
        )
    return stats, weight


@pytest.mark.parametrize("layer", [0, 1])  # the two halves of a shared G buffer
def test_the_lean_solve_equals_the_plain_one_with_half_its_workspace(layer):
    dim = 160
    stats, weight = _stats(dim, "cpu")
    with LiveTensorPeak() as plain_live:
        plain = solve_layer(stats.G(layer), stats.C(layer), stats.s(layer), weight, 1e-3)
    with LiveTensorPeak() as lean_live:
        lean = solve_layer_lean(stats, layer, weight, 1e-3, panel=dim // 10)
    torch.testing.assert_close(lean[0], plain[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(lean[1], plain[1], rtol=1e-9, atol=0.0)
    assert plain_live.peak >= 44 * dim * dim
    assert lean_live.peak <= 24.5 * dim * dim  # panels of D/10, as 512 at D = 5120


def test_a_14b_layer_solve_fits_the_planned_absorb_workspace():
    dim = 5120
    stats, weight = (
        AbsorptionStats(2, dim, "meta"),
        torch.empty(dim, dim, device="meta", dtype=torch.bfloat16),
    )
    tokens = torch.empty(8, dim, device="meta")
    stats.update(0, tokens, tokens, weight)
    with LiveTensorPeak() as live:
        solve_layer_lean(stats, 0, weight, 1e-3)
    assert live.peak <= ABSORB_WORKSPACE_BYTES_PER_DIM2 * dim * dim
    assert live.peak > (ABSORB_WORKSPACE_BYTES_PER_DIM2 - 4) * dim * dim  # the plan is not padded either


def test_an_indefinite_system_gives_a_nan_error():
    stats, weight = _stats(16, "cpu")
    stats._G_pairs[0].diagonal().fill_(-1.0)  # G + lam I cannot be positive definite
    _, eps = solve_layer_lean(stats, 0, weight, 1e-3, panel=4)
    assert torch.isnan(eps)
