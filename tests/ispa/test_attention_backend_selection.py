"""The rule that picks an attention backend, and the CPU-checkable parts of the CUDA-only backends.

The CUDA kernels themselves are checked against the fp64 reference by `test_attention_lse.py`, which covers every
backend `available_backends("cuda")` lists wherever a CUDA device exists.
"""

import dataclasses
import math
import sys
import types

import pytest
import torch

from ispa import attention_backends, attention_with_lse
from ispa.attention_backends import BACKENDS, PREFERENCE_ENV, available_backends, resolve_backend

CUDA_ORDER = ["flash_attn3", "cudnn", "flash_attn", "torch_cuda", "math"]


@pytest.fixture
def installed(monkeypatch):
    """Pretend the named optional backends are installed (and the others not)."""
    monkeypatch.delenv(PREFERENCE_ENV, raising=False)

    def pretend(*names):
        for name in ("flash_attn3", "cudnn", "flash_attn"):
            present = name in names
            backend = dataclasses.replace(BACKENDS[name], installed=lambda present=present: present)
            monkeypatch.setitem(BACKENDS, name, backend)

    return pretend


def chosen(dtype, head_dim, device_type="cuda"):
    return resolve_backend(None, device_type, dtype, head_dim).name


def test_fastest_first_then_by_what_each_kernel_supports(installed):
    installed("flash_attn3", "cudnn", "flash_attn")
    assert available_backends("cuda") == CUDA_ORDER
    assert chosen(torch.bfloat16, 128) == "flash_attn3"
    assert chosen(torch.float32, 128) == "torch_cuda"  # no half-only kernel takes fp32
    installed("cudnn", "flash_attn")
    assert available_backends("cuda") == CUDA_ORDER[1:]
    assert chosen(torch.bfloat16, 128) == chosen(torch.float16, 64) == "cudnn"
    assert chosen(torch.bfloat16, 256) == "flash_attn"  # cuDNN stops at head_dim 128
    assert chosen(torch.bfloat16, 100) == "flash_attn"  # and wants a multiple of 8
    installed()
    assert available_backends("cuda") == ["torch_cuda", "math"]
    assert chosen(torch.bfloat16, 128) == "torch_cuda"
    assert chosen(torch.bfloat16, 128, "cpu") == "torch_cpu"


def test_the_environment_variable_replaces_the_order(installed, monkeypatch):
    installed("flash_attn3", "cudnn", "flash_attn")
    monkeypatch.setenv(PREFERENCE_ENV, "torch_cuda, cudnn ,math")
    assert available_backends("cuda") == ["torch_cuda", "cudnn", "math"]
    assert chosen(torch.bfloat16, 128) == "torch_cuda"
    monkeypatch.setenv(PREFERENCE_ENV, "cudnn")
    assert chosen(torch.bfloat16, 128) == "cudnn"
    with pytest.raises(ValueError, match="no attention backend"):
        chosen(torch.float32, 128)  # cuDNN alone cannot take fp32
    monkeypatch.setenv(PREFERENCE_ENV, "cudnn,flash_attn4")
    with pytest.raises(
        ValueError, match=f"{PREFERENCE_ENV} names unknown attention backends \\['flash_attn4'\\]"
    ):
        available_backends("cuda")


def test_an_explicit_backend_is_checked_against_the_device_and_dtype(installed):
    installed("cudnn")
    assert resolve_backend("cudnn", "cuda", torch.bfloat16, 128).name == "cudnn"
    with pytest.raises(ValueError, match="does not support torch.float32"):
        resolve_backend("cudnn", "cuda", torch.float32, 128)
    with pytest.raises(ValueError, match="not available on cpu"):
        resolve_backend("cudnn", "cpu", torch.bfloat16, 128)


def test_cudnn_lse_comes_back_as_b_h_lq_on_meta():
    # The meta kernel mirrors the CUDA op's output shapes: the LSE is [B, H, Lq, 1] there.
    q = torch.empty(2, 5, 3, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 7, 3, 128, dtype=torch.bfloat16, device="meta")
    raw = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), None, True, 0.0, False, False, scale=0.1
    )
    assert raw[1].shape == (2, 3, 5, 1)
    out, lse = BACKENDS["cudnn"].kernel(q, k, k, 0.1)
    assert out.shape == (2, 5, 3, 128) and out.dtype == torch.bfloat16
    assert lse.shape == (2, 3, 5) and lse.dtype == torch.float32


def test_an_lse_of_an_unexpected_shape_is_refused():
    q = torch.zeros(1, 5, 2, 8)
    padded = torch.zeros(1, 2, 32)  # e.g. a query axis padded to 32, left unsliced
    with pytest.raises(RuntimeError, match="LSE of shape \\(1, 2, 32\\)"):
        attention_backends._as_bhl(padded, q)


def test_flash_attn3_wrapper_passes_the_scale_and_reads_its_lse(monkeypatch):
    """A stand-in `flash_attn_interface` (the math reference in FA3's calling convention) checks the wrapper only."""
    seen = {}

    def flash_attn_func(q, k, v, softmax_scale=None, return_attn_probs=False):
        seen.update(scale=softmax_scale, probs=return_attn_probs)
        return BACKENDS["math"].kernel(q, k, v, softmax_scale)

    monkeypatch.setitem(
        sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=flash_attn_func)
    )
    attention_backends.optional_function.cache_clear()
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, n, 2, 16, generator=gen) for n in (4, 9, 9))
        out, lse = BACKENDS["flash_attn3"].kernel(q, k, v, 0.3)
        ref_out, ref_lse = attention_with_lse(q, k, v, scale=0.3, backend="math")
        assert seen == {"scale": 0.3, "probs": True}
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse) and lse.shape == (1, 2, 4)
        assert math.isfinite(float(lse.sum()))
    finally:
        attention_backends.optional_function.cache_clear()
