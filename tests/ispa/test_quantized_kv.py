"""Quantized KV storage: bytes against live tensors and hand arithmetic, dequantization error bounds, the ring
contract, and ISPA + quantized KV equal to Full + quantized KV until the absorb."""

from __future__ import annotations

import pytest
import torch

from ispa import AttentionSession, CacheLayout, FullPolicy, ISPAPolicy
from ispa.cache import SinkRingLayer
from ispa.kv_codecs import Fp8ChannelCodec, Fp8TokenCodec, Int4Codec
from ispa.quantized_cache import (
    KV_FORMATS,
    QuantizedRingLayer,
    history_ring_bytes,
    int4_key_group,
    kv_layer_factory,
    quantizes_sink,
    residual_window_tokens,
    sink_bytes,
    sink_bytes_per_token,
)
from tests.fixtures.toy_model import ToyConfig, ToyRun, ToyTransformer

BATCH, HEADS, HEAD_DIM, BLOCK = 2, 2, 64, 32
LAYOUT = CacheLayout(block_tokens=BLOCK, history_blocks=3, num_rings=2)


def block(seed: int, dtype=torch.float32, outlier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(BATCH, BLOCK, HEADS, HEAD_DIM, generator=gen)
    k[..., 5] *= outlier  # real key caches have a few channels far larger than the rest
    return k.to(dtype), torch.randn(BATCH, BLOCK, HEADS, HEAD_DIM, generator=gen).to(dtype)


def stored_bytes(layer: QuantizedRingLayer) -> int:
    return sum(t.nbytes for ring in layer._slots for slot in ring for _, k, v, _ in slot for t in (*k, *v))


def q2_block_bytes(tokens: int) -> int:
    """One q2 chunk of keys or values by hand: 2-bit codes, a 4-bit group per token, fp16 centroids (one group
    per 48 tokens, at least 1, at most 16) and two fp16 stage scales per (head, channel)."""
    rows = BATCH * HEADS
    groups = max(1, min(16, tokens // 48))
    return rows * (tokens * HEAD_DIM // 4 + (tokens + 1) // 2 + groups * HEAD_DIM * 2 + 2 * HEAD_DIM * 2)


def test_bytes_by_hand_and_against_the_stored_tensors():
    # fp8: a byte per value and a fp32 scale per (token, head), for keys and values
    fp8 = 2 * BATCH * HEADS * (HEAD_DIM + 4)
    # int4: half a byte per value; fp16 min and step per group of 32 tokens (keys) or 32 channels (values)
    width = BATCH * HEADS * HEAD_DIM
    int4 = 2 * width // 2 + 4 * width // 32 + 4 * width // 32
    bf16 = 2 * width * 2
    per_block = {"bf16": bf16 * BLOCK, "fp8": fp8 * BLOCK, "fp8-all": fp8 * BLOCK, "int4": int4 * BLOCK}
    per_block |= {"q2": 2 * q2_block_bytes(BLOCK)}
    # LAYOUT has one frame per block, so a window of one frame is the whole newest block, kept in bf16
    per_block |= {"int4+w": per_block["int4"], "q2+w": per_block["q2"]}
    for kv_format in KV_FORMATS:
        window = residual_window_tokens(kv_format, LAYOUT)
        assert window == (BLOCK if kv_format.endswith("+w") else 0)
        layer = kv_layer_factory(kv_format)(LAYOUT)
        layer.write_sink(*block(0, torch.bfloat16))
        sink = layer.sink_nbytes()
        if kv_format in (
            "fp8-all",
        ):  # the sink stored like the history: codes plus a scale per token and head
            assert sink == BLOCK * fp8 == BLOCK * sink_bytes_per_token(kv_format, BATCH, HEADS, HEAD_DIM)
        elif kv_format.startswith("q2"):  # the sink stored in q2 as one chunk
            assert sink == 2 * q2_block_bytes(BLOCK) == sink_bytes(kv_format, BLOCK, BATCH, HEADS, HEAD_DIM)
        else:  # the sink stays bf16
            assert sink == BLOCK * bf16
        assert quantizes_sink(kv_format) == (kv_format == "fp8-all" or kv_format.startswith("q2"))
        if quantizes_sink(kv_format):
            assert sink == sum(t.nbytes for pair in layer._stored_sink for t in pair)
        for n in range(1, 5):
            layer.append(0, *block(n, torch.bfloat16))
            held = min(n, LAYOUT.history_blocks)
            # every held block quantized, except a window's newest tokens, which stay bf16
            want = (
                held * per_block[kv_format]
                if not window
                else (held - 1) * per_block[kv_format] + BLOCK * bf16
            )
            assert layer.nbytes() == sink + want, (kv_format, n)
            assert (
                layer.ring_nbytes(held)
                == want
                == history_ring_bytes(kv_format, LAYOUT, held, BATCH, HEADS, HEAD_DIM)
            )
            if kv_format != "bf16":
                assert layer.nbytes() == sink + stored_bytes(layer)
        assert layer.bytes_per_token * BLOCK == per_block[kv_format] - per_block[kv_format] % BLOCK


@pytest.mark.parametrize("outlier", [1.0, 30.0])
def test_fp8_dequantization_error_is_within_e4m3_rounding(outlier):
    x, _ = block(1, outlier=outlier)
    for codec in (Fp8TokenCodec(), Fp8ChannelCodec()):
        stored = codec.encode(x)
        out = torch.empty_like(x)
        codec.decode_into(stored, out)
        scale = stored[1]
        # round-to-nearest with 3 mantissa bits: 2^-4 relative; below e4m3's normal range, half a 2^-9 step
        bound = 2.0**-4 * x.abs() + 2.0**-10 * scale
        assert ((out - x).abs() <= bound).all(), codec.name


@pytest.mark.parametrize("axis", ["tokens", "channels"])
def test_int4_dequantization_error_is_at_most_half_a_step_of_its_group(axis):
    x, _ = block(2, outlier=20.0)
    codec = Int4Codec(axis, 16)
    packed, low, step = codec.encode(x)
    assert packed.dtype == torch.uint8 and packed.shape == (*x.shape[:-1], HEAD_DIM // 2)
    out = torch.empty_like(x)
    codec.decode_into((packed, low, step), out)
    grouped_x, dim = codec._grouped(x)
    grouped_err, _ = codec._grouped(out - x)
    span = grouped_x.amax(dim=dim, keepdim=True) - grouped_x.amin(dim=dim, keepdim=True)
    # half a step, with room for the fp16 rounding of the stored min and step
    assert (grouped_err.abs() <= 0.5 * span / 15 * (1 + 2e-3) + 1e-3 * span / 15).all()


def test_per_channel_int4_keys_keep_an_outlier_channel_from_swamping_the_others():
    x, _ = block(3, outlier=50.0)
    errors = {}
    for axis in ("tokens", "channels"):
        codec = Int4Codec(axis, 32)
        out = torch.empty_like(x)
        codec.decode_into(codec.encode(x), out)
        normal = torch.ones(HEAD_DIM, dtype=torch.bool)
        normal[5] = False
        errors[axis] = ((out - x)[..., normal].norm() / x[..., normal].norm()).item()
    assert errors["tokens"] < errors["channels"] / 5


def test_history_is_dequantized_into_one_buffer_shared_by_the_layers():
    factory = kv_layer_factory("fp8")
    first, second = factory(LAYOUT), factory(LAYOUT)
    for n in range(3):
        first.append(0, *block(n))
        second.append(1, *block(10 + n))
    k1, _ = first.history(0)
    pointer = k1.data_ptr()
    k2, v2 = second.history(1)
    assert k2.data_ptr() == pointer  # no per-forward allocation: the same buffer for every layer and call
    assert factory.buffer.nbytes() == 2 * BATCH * LAYOUT.history_tokens * HEADS * HEAD_DIM * 4
    expected = torch.cat([block(10 + n)[0] for n in range(3)], dim=1)
    torch.testing.assert_close(k2, expected, rtol=2.0**-4, atol=1e-2)


def test_a_quantized_sink_is_dequantized_into_one_buffer_shared_by_the_layers():
    factory = kv_layer_factory("fp8-all")
    first, second = factory(LAYOUT), factory(LAYOUT)
    with pytest.raises(RuntimeError, match="no sink"):
        first.sink()
    first.write_sink(*block(20))
    second.write_sink(*block(21))
    k1, v1 = first.sink()
    want_k, want_v = block(20)
    x = torch.cat([want_k, want_v])
    bound = 2.0**-4 * x.abs() + 2.0**-10 * x.abs().amax(dim=-1, keepdim=True) / 448
    assert ((torch.cat([k1, v1]) - x).abs() <= bound).all()  # within e4m3 rounding of each token's scale
    pointer = k1.data_ptr()
    k2, _ = second.sink()
    assert k2.data_ptr() == pointer and factory.sink_buffer.nbytes() == 2 * k2.nbytes
    torch.testing.assert_close(k2, block(21)[0], rtol=2.0**-4, atol=1e-2)
    first.make_local()  # a local layer keeps its sink
    torch.testing.assert_close(first.sink()[0], want_k, rtol=2.0**-4, atol=1e-2)
    first.reset()
    assert first.sink_nbytes() == 0
    with pytest.raises(ValueError, match="at least one token"):
        second.write_sink(*(t[:, :0] for t in block(22)))


@pytest.mark.parametrize("kv_format", KV_FORMATS[1:])
def test_ring_order_wrap_local_full_and_reset_match_the_bf16_ring(kv_format):
    quantized, reference = kv_layer_factory(kv_format)(LAYOUT), SinkRingLayer(LAYOUT)
    codec_error = {"fp8": 0.07, "fp8-all": 0.07, "int4": 0.2, "int4+w": 0.2, "q2": 0.4, "q2+w": 0.4}[
        kv_format
    ]
    for n in range(5):  # wraps: slots 0,1,2,0,1
        for layer in (quantized, reference):
            layer.append(0, *block(n))
        assert quantized.filled_blocks(0) == reference.filled_blocks(0)
        for got, want in zip(quantized.history(0), reference.history(0), strict=True):
            assert got.shape == want.shape
            assert ((got - want).norm() / want.norm()).item() < codec_error
    assert quantized.history(1)[0].shape[1] == 0
    quantized.make_local()
    assert quantized.nbytes() == 0 and quantized.history(0)[0].shape[1] == 0
    with pytest.raises(RuntimeError, match="local"):
        quantized.append(0, *block(0))
    quantized.make_full()
    quantized.append(0, *block(7))
    assert quantized.filled_blocks(0) == 1
    quantized.reset()
    assert quantized.nbytes() == 0 and quantized.bytes_per_token is None


def test_bad_names_and_shapes_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="kv_format"):
        kv_layer_factory("int3")
    with pytest.raises(ValueError, match="block_tokens"):
        int4_key_group(7, 64)  # a prime block: no group tiles it
    with pytest.raises(ValueError, match="head_dim"):
        Int4Codec("tokens", 4).encode(torch.zeros(1, 4, 1, 3))
    assert int4_key_group(3168, 5120) == 32  # LiveAvatar-14B at 704x384: KIVI's group of 32 tokens


TOY = ToyConfig(block_tokens=8, head_dim=16)  # int4 needs a block a group of tokens tiles
T_WARM = 3


def toy_run(policy, kv_format, blocks):
    model = ToyTransformer(TOY)
    session = AttentionSession(policy, TOY.num_layers, TOY.layout(), kv_layer=kv_layer_factory(kv_format))
    run = ToyRun(model, session, seed=5, batch=2)
    return [run.step() for _ in range(blocks)]


@pytest.mark.parametrize("kv_format", KV_FORMATS[1:])
def test_ispa_with_quantized_kv_is_bit_identical_to_full_with_it_until_the_absorb(kv_format):
    full = toy_run(FullPolicy(), kv_format, blocks=T_WARM + 2)
    ispa = toy_run(ISPAPolicy(k_fraction=0.5, t_warm=T_WARM), kv_format, blocks=T_WARM + 2)
    assert [report.event for _, report in ispa].index("absorbed") == T_WARM - 1
    for block_index in range(T_WARM):  # warmup blocks, the absorbing one included, attend exactly like Full
        for a, b in zip(full[block_index][0], ispa[block_index][0], strict=True):
            assert torch.equal(a, b), block_index
        assert full[block_index][1].kv_bytes == ispa[block_index][1].kv_bytes or block_index == T_WARM - 1
    after_full, after_ispa = full[-1][0][-1], ispa[-1][0][-1]
    assert not torch.equal(after_full, after_ispa)  # afterwards the L-layers attend locally
    # the report counts codes plus scales: after the absorb the F-layers keep their quantized rings
    ispa_report = ispa[-1][1]
    assert ispa_report.kv_bytes < full[-1][1].kv_bytes == full[-1][1].kv_bytes_full_ring


def test_quantized_kv_stays_close_to_bf16_kv_through_a_toy_run():
    reference = toy_run(FullPolicy(), "bf16", blocks=4)
    for kv_format, bound in (("fp8", 0.05), ("fp8-all", 0.05), ("int4", 0.2), ("q2", 0.5)):
        run = toy_run(FullPolicy(), kv_format, blocks=4)
        last, want = run[-1][0][-1], reference[-1][0][-1]
        assert 0 < ((last - want).norm() / want.norm()).item() < bound, kv_format
