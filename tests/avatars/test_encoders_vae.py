"""The Wan VAE wrapper: streaming block decode equals diffusers' whole decode; portrait encodes have the official shapes."""

import numpy as np
import pytest
import torch

from avatars.liveavatar.encoders.tiny import tiny_vae
from avatars.liveavatar.encoders.vae import WanVAE, portrait_to_tensor
from tests.fixtures.tiny_checkpoints import write_vae


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    write_vae(folder)
    return WanVAE.from_pretrained(folder)


# Small frames keep the test quick; the VAE's behaviour does not depend on the size (multiples of 8).
def _portrait(seed=0, size=(32, 32)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_streaming_decode_equals_one_decode_call(vae):
    latents = torch.randn(1, 16, 7, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = vae.vae.decode(vae.denormalize(latents)).sample  # diffusers' own decode of the sequence

    decoder = vae.stream_decoder()
    blocks = [decoder.decode_block(latents[:, :, i : i + 3]) for i in range(0, 6, 3)]
    blocks.append(decoder.decode_block(latents[:, :, 6:]))
    assert [b.shape[2] for b in blocks] == [9, 12, 4]  # first block: 1 + 2·4 frames, then 4 per latent frame
    torch.testing.assert_close(torch.cat(blocks, dim=2), whole, rtol=1e-5, atol=1e-5)


def test_a_new_stream_starts_a_new_video(vae):
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    first = vae.stream_decoder().decode_block(latents)
    again = vae.stream_decoder().decode_block(latents)
    assert torch.equal(first, again)
    decoder = vae.stream_decoder()
    decoder.decode_block(latents)
    assert not torch.allclose(decoder.decode_block(latents)[:, :, -9:], first)  # the cache carries history


def test_reference_and_motion_latents_follow_the_official_recipe(vae):
    portrait = _portrait()
    reference = vae.encode_reference(portrait)
    motion = vae.encode_motion(portrait)
    assert reference.shape == (1, 16, 1, 4, 4)
    assert motion.shape == (1, 16, 92, 4, 4)  # the 5-frame reference repeated 73×: 365 frames → 1 + 364/4

    pixels = portrait_to_tensor(portrait)
    assert pixels.shape == (1, 3, 1, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    mu = vae.vae.encode(pixels.repeat(1, 1, 5, 1, 1)).latent_dist.mean[:, :, 1:]
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(reference, (mu - mean) / std, rtol=1e-5, atol=1e-5)
    # a still video's latents after the first settle: the reference (latent 1 of 5 frames) is motion latent 1
    torch.testing.assert_close(reference[:, :, 0], motion[:, :, 1], rtol=1e-4, atol=1e-4)
    reference_video = pixels.repeat(1, 1, 5, 1, 1)
    torch.testing.assert_close(motion, vae.encode(reference_video.repeat(1, 1, 73, 1, 1)), rtol=0, atol=0)


def test_framepack_window_of_the_official_motion_differs_from_a_73_frame_encode(vae):
    """The 19 latents FramePack reads: steady-state ones of the 365-frame encode, not a 19-latent encode's."""
    portrait = _portrait(seed=2)
    official = vae.encode_motion(portrait)[:, :, -19:]
    short = vae.encode_motion(portrait, motion_frames=73)
    assert short.shape == official.shape
    # Latent 0 of the short encode is a one-image latent; the 365-frame window has none.
    assert not torch.allclose(short[:, :, 0], official[:, :, 0], rtol=1e-3, atol=1e-3)


def test_decode_inverts_the_normalisation(vae):
    latents = torch.randn(1, 16, 2, 4, 4)
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(vae.denormalize(latents), latents * std + mean)


def test_bad_inputs_raise_value_error(vae):
    with pytest.raises(ValueError, match="uint8 RGB"):
        vae.encode_reference(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode_reference(_portrait(size=(28, 32)))
    with pytest.raises(ValueError, match="1 more than a multiple of 4"):
        vae.encode_motion(_portrait(), motion_frames=72)
    with pytest.raises(ValueError, match="latents must be"):
        vae.stream_decoder().decode_block(torch.zeros(1, 4, 3, 4, 4))


def test_tiny_vae_has_the_real_compression():
    model = tiny_vae()
    assert model.config.z_dim == 16 and model.spatial_compression_ratio == 8
    assert model.config.temperal_downsample == [False, True, True]
