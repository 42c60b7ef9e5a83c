"""Every attention backend on this machine against an fp64 reference, and LSE merging against full attention."""

from __future__ import annotations

import math

import pytest
import torch

from ispa import attention_with_lse, available_backends, merge_attention
from ispa.attention_backends import BACKENDS as BACKEND_REGISTRY


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


BACKENDS = [(device, name) for device in _devices() for name in available_backends(device)]
FP32_BACKENDS = [  # flash-attn 2/3 and cuDNN: fp16/bf16 only
    (device, name) for device, name in BACKENDS if BACKEND_REGISTRY[name].supports(torch.float32, 64)
]
# (batch, queries, keys, heads, head_dim)
SHAPES = [(1, 1, 1, 1, 8), (2, 7, 13, 3, 16), (1, 33, 65, 4, 32), (3, 5, 40, 2, 64)]


def reference_attention(q, k, v, scale):
    """Softmax attention and natural-log LSE in fp64, written independently of the library."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v.double())
    return out, torch.logsumexp(scores, dim=-1)


def random_qkv(shape, dtype=torch.float32, device="cpu", seed=0):
    batch, queries, keys, heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, head_dim, generator=gen)
    k = torch.randn(batch, keys, heads, head_dim, generator=gen)
    v = torch.randn(batch, keys, heads, head_dim, generator=gen)
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


@pytest.mark.parametrize(("device", "backend"), FP32_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_reference_fp32(device, backend, shape):
    q, k, v = random_qkv(shape, device=device)
    scale = 1.0 / math.sqrt(shape[-1])
    out, lse = attention_with_lse(q, k, v, backend=backend)
    ref_out, ref_lse = reference_attention(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (shape[0], shape[3], shape[1]) and lse.dtype == torch.float32
    assert (out.double() - ref_out).abs().max().item() <= 1e-5
    # Natural log: a base-2 LSE would be off by a factor 1/ln 2 here.
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_backend_matches_reference_bf16(device, backend, head_dim):
    """Every backend, the half-only ones (cuDNN, flash-attn 2/3 on CUDA) included; head_dim 128 is LiveAvatar's."""
    q, k, v = random_qkv((2, 40, 150, 3, head_dim), dtype=torch.bfloat16, device=device, seed=3)
    out, lse = attention_with_lse(q, k, v, backend=backend)
    ref_out, ref_lse = reference_attention(q, k, v, 1.0 / math.sqrt(head_dim))
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (2, 3, 40) and lse.dtype == torch.float32
    assert ((out.double() - ref_out).norm() / ref_out.norm()).item() <= 1e-2  # bf16 output rounding
    # fp32 accumulation of exact bf16 products; a base-2 LSE would be off by ~40 % here
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-3


@pytest.mark.parametrize(("device", "backend"), FP32_BACKENDS)
def test_explicit_scale_is_used(device, backend):
    q, k, v = random_qkv((2, 6, 9, 2, 16), device=device)
    out, lse = attention_with_lse(q, k, v, scale=0.37, backend=backend)
    ref_out, ref_lse = reference_attention(q, k, v, 0.37)
    assert (out.double() - ref_out).abs().max().item() <= 1e-5
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-5


def _merged_over_split(q, k, v, split, backend):
    local = attention_with_lse(q, k[:, :split], v[:, :split], backend=backend)
    history = attention_with_lse(q, k[:, split:], v[:, split:], backend=backend)
    return merge_attention(*local, *history)


@pytest.mark.parametrize(("device", "backend"), FP32_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_merge_equals_attention_over_union_fp32(device, backend, shape):
    q, k, v = random_qkv(shape, device=device, seed=1)
    keys = shape[2]
    ref_out, ref_lse = reference_attention(q, k, v, 1.0 / math.sqrt(shape[-1]))
    # split = keys: empty history; keys - 1: a history of one token; 1: a local part of one token.
    for split in (keys, keys - 1, 1, keys // 2):
        out, lse = _merged_over_split(q, k, v, split, backend)
        assert out.dtype == torch.float32
        assert (out.double() - ref_out).abs().max().item() <= 1e-5, split
        assert (lse.double() - ref_lse).abs().max().item() <= 1e-5, split


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_merge_equals_attention_over_union_bf16(device, backend):
    q, k, v = random_qkv((2, 24, 96, 4, 64), dtype=torch.bfloat16, device=device, seed=2)
    ref_out, _ = reference_attention(q, k, v, 1.0 / 8.0)
    for split in (96, 95, 40):
        out, _ = _merged_over_split(q, k, v, split, backend)
        assert out.dtype == torch.bfloat16
        relative = (out.double() - ref_out).norm() / ref_out.norm()
        assert relative.item() <= 2e-2, split


@pytest.mark.parametrize(("device", "backend"), FP32_BACKENDS)
def test_empty_key_set_returns_zero_weight_without_calling_a_kernel(device, backend):
    q, k, v = random_qkv((2, 5, 0, 3, 8), device=device)
    out, lse = attention_with_lse(q, k, v, backend=backend)
    assert torch.equal(out, torch.zeros_like(q))
    assert lse.shape == (2, 3, 5) and torch.isneginf(lse).all()


def test_empty_query_set():
    q, k, v = random_qkv((1, 0, 4, 2, 8))
    out, lse = attention_with_lse(q, k, v, backend="torch_cpu")
    assert out.shape == (1, 0, 2, 8) and lse.shape == (1, 2, 0)


def test_merge_with_an_empty_part_returns_the_other_part_exactly():
    q, k, v = random_qkv((2, 5, 7, 3, 8))
    part = attention_with_lse(q, k, v)
    empty = attention_with_lse(q, k[:, :0], v[:, :0])
    for first, second in ((part, empty), (empty, part)):
        out, lse = merge_attention(*first, *second)
        assert torch.equal(out, part[0])
        assert torch.equal(lse, part[1])


def test_merge_treats_a_neg_inf_lse_as_empty():
    q, k, v = random_qkv((1, 4, 6, 2, 8))
    out, lse = attention_with_lse(q, k, v)
    merged, merged_lse = merge_attention(out, lse, torch.zeros_like(out), torch.full_like(lse, -math.inf))
    assert torch.equal(merged, out)
    assert torch.equal(merged_lse, lse)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("side", ["lse_a", "lse_b"])
def test_merge_never_drops_a_nan_or_pos_inf_lse_as_an_empty_part(bad, side):
    """The failed query's output is NaN (the session flags it, tests/ispa/test_session_contract.py); the others are
    merged as usual."""
    q, k, v = random_qkv((1, 4, 6, 2, 8))
    out, lse = attention_with_lse(q, k, v)
    flagged = lse.clone()
    flagged[0, 1, 2] = bad  # one query of one head failed
    parts = (out, flagged, out, lse) if side == "lse_a" else (out, lse, out, flagged)
    merged, merged_lse = merge_attention(*parts)
    expected, expected_lse = merge_attention(out, lse, out, lse)
    assert torch.isnan(merged[0, 2, 1]).all()
    failed = torch.zeros_like(merged, dtype=torch.bool)
    failed[0, 2, 1] = True
    assert torch.equal(merged[~failed], expected[~failed])
    assert not math.isfinite(merged_lse[0, 1, 2])
    failed_lse = torch.zeros_like(lse, dtype=torch.bool)
    failed_lse[0, 1, 2] = True
    assert torch.equal(merged_lse[~failed_lse], expected_lse[~failed_lse])


def test_merge_of_two_empty_parts_is_zero_with_neg_inf_lse():
    q, k, v = random_qkv((1, 3, 0, 2, 8))
    empty = attention_with_lse(q, k, v)
    out, lse = merge_attention(*empty, *empty)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()


def test_merge_output_takes_out_a_dtype_and_lse_is_fp32():
    q, k, v = random_qkv((1, 4, 8, 2, 8), dtype=torch.bfloat16)
    a = attention_with_lse(q, k[:, :3], v[:, :3], backend="torch_cpu")
    b = attention_with_lse(q, k[:, 3:], v[:, 3:], backend="torch_cpu")
    out, lse = merge_attention(*a, *b)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_auto_backend_on_cpu_is_the_fused_kernel():
    q, k, v = random_qkv((1, 4, 8, 2, 8))
    auto = attention_with_lse(q, k, v)
    fused = attention_with_lse(q, k, v, backend="torch_cpu")
    assert torch.equal(auto[0], fused[0]) and torch.equal(auto[1], fused[1])


def test_unknown_or_unavailable_backend_raises():
    q, k, v = random_qkv((1, 2, 3, 1, 8))
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention_with_lse(q, k, v, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            attention_with_lse(q, k, v, backend="torch_cuda")
    assert "torch_cuda" not in available_backends("cpu")
    assert available_backends("cpu")[-1] == "math"


@pytest.mark.parametrize(
    ("q_shape", "k_shape"),
    [
        ((1, 2, 3), (1, 4, 3, 8)),
        ((1, 2, 3, 8), (1, 4, 2, 8)),
        ((1, 2, 3, 8), (1, 4, 3, 4)),
        ((2, 2, 3, 8), (1, 4, 3, 8)),
    ],
)
def test_mismatched_shapes_raise(q_shape, k_shape):
    with pytest.raises(ValueError):
        attention_with_lse(torch.randn(q_shape), torch.randn(k_shape), torch.randn(k_shape))


def test_mismatched_dtypes_raise():
    q, k, v = random_qkv((1, 2, 3, 1, 8))
    with pytest.raises(ValueError, match="dtype"):
        attention_with_lse(q, k.double(), v)


def test_merge_rejects_mismatched_shapes():
    out = torch.zeros(1, 4, 2, 8)
    lse = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError):
        merge_attention(out, lse, torch.zeros(1, 5, 2, 8), lse)
    with pytest.raises(ValueError):
        merge_attention(out, lse, out, torch.zeros(1, 4, 2))
