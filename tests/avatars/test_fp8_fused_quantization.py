"""FP8 activation quantization as one compiled function (`set_fused_quantization`) against the eager one."""

from __future__ import annotations

import pytest
import torch

from avatars.liveavatar import fp8_linear
from avatars.liveavatar.fp8_linear import (
    FP8_DTYPE,
    QuantizedInput,
    fused_quantization,
    quantize_per_tensor,
    set_fused_quantization,
)


@pytest.fixture
def fused():
    set_fused_quantization(True)
    yield
    set_fused_quantization(False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_quantization_gives_the_eager_values_and_scale(fused, dtype):
    x = (torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(0)) * 7).to(dtype)
    x[0, 0, 0] = 300.0  # an outlier sets the scale
    quantized = QuantizedInput.of(x)
    assert fused_quantization(), fp8_linear._fused_quantization["failed"]  # compiled, not fallen back
    values, scale = quantize_per_tensor(x.reshape(-1, 64))
    assert quantized.values.dtype == FP8_DTYPE and quantized.leading_shape == (2, 40)
    assert torch.equal(quantized.values.view(torch.uint8), values.view(torch.uint8))  # bit for bit
    assert torch.equal(quantized.scale, scale)


def test_a_compile_failure_falls_back_to_the_eager_quantization(fused, monkeypatch, caplog):
    def broken(x):
        raise RuntimeError("inductor says no")

    monkeypatch.setattr(fp8_linear, "_compiled_quantize", lambda: broken)
    monkeypatch.setitem(fp8_linear._fused_quantization, "failed", None)
    x = torch.randn(8, 16)
    values, scale = fp8_linear.quantize_activation(x)
    assert torch.equal(values.view(torch.uint8), quantize_per_tensor(x)[0].view(torch.uint8))
    assert not fused_quantization() and "quantizing eagerly from now on" in caplog.text
    with pytest.raises(ValueError, match="fused quantization must be True or False"):
        set_fused_quantization("on")
