"""The KV-format accuracy bench measures what the storage really holds, and its figures stay where the README
says (fp8 at most 1 % per layer on the tiny model; KIVI's per-channel keys win when keys have outlier channels)."""

from __future__ import annotations

import torch

from avatars.liveavatar.dit.rope import apply_rope, rope_angles
from bench.kv_formats import (
    CODEC_PAIRS,
    FP8_ALL,
    _fit,
    dit_drift,
    output_error,
    roundtrip,
    synthetic_heads,
    tiny_layer_errors,
    with_fp8_sink,
)
from ispa import CacheLayout
from ispa.quantized_cache import kv_layer_factory

FP8 = "fp8 (token scales, chosen)"
KIVI = "int4 KIVI (K per channel/32 tokens, V per token/32 ch, chosen)"
PER_TOKEN = "int4 per token (K and V per token/32 ch)"


def test_the_bench_roundtrip_is_what_a_quantized_ring_returns():
    layout = CacheLayout(block_tokens=32, history_blocks=3)
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randn(1, 32, 2, 32, generator=gen).to(torch.bfloat16) for _ in range(3)]
    for kv_format, name in (("fp8", FP8), ("int4", KIVI)):
        layer = kv_layer_factory(kv_format)(layout)
        for b in blocks:
            layer.append(0, b, b)
        hist_k, hist_v = layer.history(0)
        key_codec, value_codec = CODEC_PAIRS[name]
        keys = torch.cat(blocks, dim=1)
        assert torch.equal(roundtrip(key_codec, keys, 32), hist_k), kv_format
        assert torch.equal(roundtrip(value_codec, keys, 32), hist_v), kv_format


def test_per_channel_int4_keys_beat_per_token_ones_when_keys_have_outlier_channels():
    captured = synthetic_heads(seed=3, outliers=10.0, block_tokens=64)
    kivi = output_error(CODEC_PAIRS[KIVI], captured, 64)
    per_token = output_error(CODEC_PAIRS[PER_TOKEN], captured, 64)
    fp8 = output_error(CODEC_PAIRS[FP8], captured, 64)
    assert fp8 < kivi < per_token / 1.5


def test_fp8_changes_each_tiny_layer_by_at_most_one_percent_and_int4_by_more():
    errors, block_tokens = tiny_layer_errors(blocks=2)
    assert all(0 < e <= 0.01 for e in errors[FP8])
    assert all(fp8 < int4 for fp8, int4 in zip(errors[FP8], errors[KIVI], strict=True))
    assert _fit(CODEC_PAIRS[KIVI][0], block_tokens).group == 32  # 96-token blocks: KIVI's group fits


def test_a_whole_tiny_run_drifts_a_little_from_bf16_kv():
    drift, scale = dit_drift("fp8", blocks=2)
    assert 0 < drift < 0.05 * scale


def test_the_fp8_all_sink_measured_is_what_an_fp8_all_layer_gives_attention():
    gen = torch.Generator().manual_seed(1)
    raw_k, raw_v = (torch.randn(1, 24, 2, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
    angles = rope_angles(torch.randint(-5, 30, (24, 3), generator=gen), 16)
    block_k = torch.randn(1, 8, 2, 16, generator=gen).to(torch.bfloat16)
    local_k = torch.cat([apply_rope(raw_k, angles), block_k], dim=1)
    local_v = torch.cat([raw_v, block_k], dim=1)
    got_k, got_v = with_fp8_sink((None, local_k, local_v, None, None), (raw_k, raw_v), angles)
    layer = kv_layer_factory("fp8-all")(CacheLayout(block_tokens=8, history_blocks=3))
    layer.write_sink(raw_k, raw_v)
    stored_k, stored_v = layer.sink()
    assert torch.equal(got_k[:, :24], apply_rope(stored_k, angles)) and torch.equal(got_v[:, :24], stored_v)
    assert torch.equal(got_k[:, 24:], block_k) and not torch.equal(got_k, local_k)


def test_storing_the_sink_in_fp8_too_adds_error_on_every_tiny_layer():
    errors, _ = tiny_layer_errors(blocks=2)
    assert all(fp8 < both <= 0.02 for fp8, both in zip(errors[FP8], errors[FP8_ALL], strict=True))


def test_the_storage_bench_counts_each_format_as_its_layers_hold_it():
    from types import SimpleNamespace

    from bench.kv_formats import storage_errors
    from ispa.quantized_cache import KV_FORMATS, history_ring_bytes, quantizes_sink, sink_bytes

    gen = torch.Generator().manual_seed(2)
    heads, dim, sink, block = 2, 16, 24, 48
    layout = CacheLayout(block_tokens=block, history_blocks=3, num_rings=4, frames_per_block=3)
    angles = rope_angles(torch.randint(-5, 30, (sink, 3), generator=gen), dim)
    raw_k, raw_v = (torch.randn(1, sink, heads, dim, generator=gen).to(torch.bfloat16) for _ in range(2))
    block_k, block_v, q = (
        torch.randn(1, block, heads, dim, generator=gen).to(torch.bfloat16) for _ in range(3)
    )
    hist_k, hist_v = (
        torch.randn(1, 3 * block, heads, dim, generator=gen).to(torch.bfloat16) for _ in range(2)
    )
    local_k = torch.cat([apply_rope(raw_k, angles), block_k], dim=1)
    local_v = torch.cat([raw_v, block_v], dim=1)
    session = SimpleNamespace(
        captured={0: (q, local_k, local_v, hist_k, hist_v)}, raw_sinks={0: (raw_k, raw_v)}
    )
    results = storage_errors(session, layout, angles)
    assert list(results) == list(KV_FORMATS[1:])
    bf16_sink = sink * 2 * heads * dim * 2
    bf16 = history_ring_bytes("bf16", layout, 3, 1, heads, dim) + bf16_sink
    for kv_format, row in results.items():
        stored_sink = (
            sink_bytes(kv_format, sink, 1, heads, dim)
            if quantizes_sink(kv_format)
            else bf16 - 3 * block * 128
        )
        held = stored_sink + history_ring_bytes(kv_format, layout, 3, 1, heads, dim)
        assert row["bytes_vs_bf16"] == held / bf16, kv_format
        assert row["key_error"] > 0 and 0 < row["output_error"] < 1
    for base in ("int4", "q2"):  # the window's newest frame is exact, so the history error drops
        assert results[f"{base}+w"]["key_error"] < results[base]["key_error"]
        assert results[f"{base}+w"]["bytes_vs_bf16"] > results[base]["bytes_vs_bf16"]
