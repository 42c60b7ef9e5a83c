"""The portrait-latent cache: the same latents as a fresh encode, one encode per portrait, bounded."""

import numpy as np
import pytest
import torch

from avatars.liveavatar.encoders.tiny import tiny_vae
from avatars.liveavatar.encoders.vae import WanVAE
from avatars.liveavatar.portrait_latents import PortraitLatentCache


@pytest.fixture(scope="module")
def vae():
    return WanVAE(tiny_vae())


def _portrait(seed):
    return np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def test_cached_latents_equal_a_fresh_encode_and_are_reused(vae):
    cache = PortraitLatentCache(vae)
    portrait = _portrait(0)
    first = cache.get(portrait)
    assert torch.equal(first.reference, vae.encode_reference(portrait))
    assert torch.equal(first.motion, vae.encode_motion(portrait))
    assert cache.get(portrait.copy()) is first and cache.encodes == 1  # keyed by the pixels, not the object


def test_size_and_pixels_are_part_of_the_key_and_the_cache_is_bounded(vae):
    cache = PortraitLatentCache(vae, capacity=1)
    a, b = _portrait(1), _portrait(1)
    b[0, 0, 0] ^= 1  # one bit differs
    cache.get(a)
    cache.get(b)
    assert cache.encodes == 2 and len(cache) == 1
    cache.get(a)  # evicted by b
    assert cache.encodes == 3
    flat = a.reshape(8, 32, 3)  # the same bytes in another shape
    assert cache.get(flat).motion.shape[-2:] == (1, 4)
    assert cache.encodes == 4
    with pytest.raises(ValueError, match="capacity"):
        PortraitLatentCache(vae, capacity=0)
