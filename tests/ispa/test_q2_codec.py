"""The 2-bit QVG-style codec and KIVI's residual window: q2's round-trip error within the bound its stages give, its
smoothing earning its centroids on grouped tokens, its bytes, and a window that keeps exactly the newest tokens."""

from __future__ import annotations

import pytest
import torch

from ispa import CacheLayout
from ispa.kv_codec_q2 import Q2Codec, _nearest
from ispa.quantized_cache import history_ring_bytes, kv_layer_factory, residual_window_tokens


def keys(seed: int, tokens: int = 96, heads: int = 2, dim: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, heads, dim, generator=gen) + 2 * torch.randn(heads, dim, generator=gen)
    x[..., 3] *= 25.0  # an outlier channel, as real key caches have
    return x


def stage_bound(x: torch.Tensor, stored: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """|error| allowed per (row, channel): M1 = the largest |x - centroid| over the block, and each one-bit stage
    with scale a leaves at most max(M - a, a)."""
    _, index, centroids, scales = stored
    batch, tokens, heads, dim = x.shape
    rows = x.permute(0, 2, 1, 3).reshape(batch * heads, tokens, dim)
    assign = torch.stack([index & 0x0F, index >> 4], dim=-1).flatten(1)[:, :tokens].long()
    residual = rows - torch.gather(centroids.float(), 1, assign.unsqueeze(-1).expand_as(rows))
    bound = residual.abs().amax(dim=1, keepdim=True)
    for scale in scales.float():
        bound = torch.maximum(bound - scale, scale)
    return bound


@pytest.mark.parametrize("tokens", [96, 7])
def test_round_trip_error_is_within_the_bound_of_its_stages(tokens):
    x = keys(0, tokens=tokens)
    codec = Q2Codec()
    stored = codec.encode(x)
    out = torch.empty_like(x)
    codec.decode_into(stored, out)
    bound = stage_bound(x, stored)
    error = (out - x).abs().permute(0, 2, 1, 3).reshape(bound.shape[0], tokens, -1)
    assert (error <= bound * (1 + 1e-5) + 1e-5).all()
    # the bound is not vacuous: two stages leave at most the block's own |residual| range per channel
    assert error.max() > 0 and (bound < x.abs().amax()).all()
    # every token sits in the group of its nearest stored centroid
    rows = x.permute(0, 2, 1, 3).reshape(-1, tokens, x.shape[-1])
    assign = torch.stack([stored[1] & 0x0F, stored[1] >> 4], dim=-1).flatten(1)[:, :tokens]
    assert torch.equal(assign.long(), _nearest(rows, stored[2].float()))


def test_bf16_blocks_decode_within_the_bound_plus_bf16_rounding():
    x = keys(1).to(torch.bfloat16)
    codec = Q2Codec()
    stored = codec.encode(x)
    out = torch.empty_like(x)
    codec.decode_into(stored, out)
    bound = stage_bound(x.float(), stored).view(1, 2, 1, -1).transpose(1, 2)
    assert ((out.float() - x.float()).abs() <= bound * (1 + 1e-5) + 2.0**-8 * out.float().abs() + 1e-5).all()


def test_smoothing_by_groups_beats_one_centroid_on_tokens_from_a_few_regions():
    gen = torch.Generator().manual_seed(2)
    regions = 5 * torch.randn(4, 2, 16, generator=gen)  # 4 "regions" per head, as sky / face / hair / cloth
    x = regions[torch.randint(0, 4, (192,), generator=gen)].unsqueeze(0) + 0.05 * torch.randn(1, 192, 2, 16)
    errors = {}
    for groups in (1, 16):
        codec = Q2Codec(max_clusters=groups)
        out = torch.empty_like(x)
        codec.decode_into(codec.encode(x), out)
        errors[groups] = ((out - x).norm() / x.norm()).item()
    assert errors[16] < errors[1] / 10 and errors[16] < 0.02


@pytest.mark.parametrize("tokens", [1, 7, 48, 200])
def test_block_bytes_equal_the_stored_tensors(tokens):
    codec = Q2Codec()
    stored = codec.encode(keys(3, tokens=tokens, heads=3, dim=8))
    assert codec.block_nbytes(1, tokens, 3, 8) == sum(t.nbytes for t in stored)
    assert stored[2].shape[1] == codec.clusters(tokens) == max(1, min(16, tokens // 48))


def test_bad_settings_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="head_dim"):
        Q2Codec().encode(torch.zeros(1, 4, 1, 6))
    with pytest.raises(ValueError, match="max_clusters"):
        Q2Codec(max_clusters=17)
    with pytest.raises(ValueError, match="tokens_per_cluster"):
        Q2Codec(tokens_per_cluster=0)


LAYOUT = CacheLayout(block_tokens=32, history_blocks=3, num_rings=2, frames_per_block=4)


@pytest.mark.parametrize("kv_format", ["int4+w", "q2+w"])
def test_the_window_keeps_exactly_the_newest_frame_of_each_ring_unquantized(kv_format):
    window = residual_window_tokens(kv_format, LAYOUT)
    assert window == 8 and residual_window_tokens(kv_format.removesuffix("+w"), LAYOUT) == 0
    layer, plain = kv_layer_factory(kv_format)(LAYOUT), kv_layer_factory(kv_format.removesuffix("+w"))(LAYOUT)
    layer.write_sink(*keys(9, tokens=4).to(torch.bfloat16).chunk(2, dim=2))
    blocks = [keys(10 + n, tokens=32, heads=2).to(torch.bfloat16).chunk(2, dim=2) for n in range(5)]
    for n, (k, v) in enumerate(blocks):  # wraps: slots 0, 1, 2, 0, 1
        layer.append(0, k, v)
        plain.append(0, k, v)
        history = layer.history(0)
        slot = n % 3
        span = slice(slot * 32, (slot + 1) * 32)
        for got, want in zip(history, (k, v), strict=True):
            assert torch.equal(got[:, span][:, -window:], want[:, -window:])  # the newest frame, as computed
            assert not torch.equal(got[:, span][:, :-window], want[:, :-window])  # its head quantized
        if n:  # the block before it is quantized whole now, its window too
            older = slice(((n - 1) % 3) * 32, ((n - 1) % 3 + 1) * 32)
            assert not torch.equal(history[0][:, older][:, -window:], blocks[n - 1][0][:, -window:])
        held = min(n + 1, 3)
        assert layer.nbytes() - layer.sink_nbytes() == history_ring_bytes(kv_format, LAYOUT, held, 1, 1, 16)
        assert layer.nbytes() - layer.sink_nbytes() > plain.nbytes() - plain.sink_nbytes()
    want = torch.cat([blocks[n][0] for n in (3, 4, 2)], dim=1).float()  # slot order after the wrap
    errors = [((ring.history(0)[0].float() - want).norm() / want.norm()).item() for ring in (layer, plain)]
    assert errors[0] < errors[1]  # the window lowers the ring's error
    layer.make_local()
    layer.make_full()
    layer.append(0, *blocks[0])
    assert torch.equal(layer.history(0)[0][:, -window:], blocks[0][0][:, -window:])


def test_a_window_needs_whole_frames():
    with pytest.raises(ValueError, match="frames_per_block"):
        residual_window_tokens("q2+w", CacheLayout(block_tokens=10, history_blocks=2, frames_per_block=3))
