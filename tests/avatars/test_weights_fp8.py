"""FP8 linear layers: e4m3 round-trip precision, the exact fallback, the kernel choice per device, and the model
conversion."""

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avatars.liveavatar import fp8_linear
from avatars.liveavatar.dit.attention import SelfAttention
from avatars.liveavatar.fp8_linear import (
    FP8_MAX,
    FP8Linear,
    QuantizedInput,
    dequantize,
    linears_on_shared_input,
    quantize_per_tensor,
)
from avatars.liveavatar.weights.fp8 import EXCLUDED_FROM_FP8, convert_linears_to_fp8

# e4m3 keeps 3 mantissa bits: rounding a normal number costs at most half a step, 2^-4 of its magnitude;
# below 2^-6 (subnormals) the step is fixed at 2^-9, so the error is at most 2^-10 (in scaled units).
_REL = 2.0**-4
_SUBNORMAL_ABS = 2.0**-10


@pytest.mark.parametrize("magnitude", [1e-3, 0.05, 1.0, 300.0])
def test_round_trip_error_is_within_e4m3_precision(magnitude):
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * magnitude
    x_fp8, scale = quantize_per_tensor(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.dim() == 0
    back = dequantize(x_fp8, scale)
    bound = torch.maximum(x.abs() * _REL, torch.full_like(x, _SUBNORMAL_ABS) * scale)
    assert torch.all((back - x).abs() <= bound * 1.0001)
    # The multiplier is FP8_MAX / amax, capped at FP8_MAX (official): the largest value lands on ±448 when amax ≥ 1.
    amax = x.abs().max()
    expected_scale = max(amax / FP8_MAX, torch.tensor(1.0 / FP8_MAX))
    torch.testing.assert_close(scale, expected_scale.float(), rtol=1e-6, atol=0)


def test_fallback_forward_is_the_dequantized_matmul():
    linear = nn.Linear(32, 16)
    layer = FP8Linear.from_linear(linear)
    x = torch.randn(2, 5, 32)
    expected = F.linear(x, layer.weight_fp8.float() * layer.weight_scale, linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    # and it is close to the original layer (weights rounded to e4m3 only)
    assert (layer(x) - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


def test_from_linear_keeps_the_source_dtype_as_its_activation_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        layer = FP8Linear.from_linear(nn.Linear(8, 4).to(dtype))
        assert layer.activation_dtype == dtype and layer.bias.dtype == dtype
    with pytest.raises(ValueError, match="activation_dtype"):
        FP8Linear(torch.zeros(4, 4, dtype=torch.float8_e4m3fn), torch.tensor(1.0), None, torch.float8_e4m3fn)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.time_embedding = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8))
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(8, 8), "o": nn.Linear(8, 8)}) for _ in range(2)
        )
        self.head = nn.Module()
        self.head.head = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(8)


def test_convert_linears_skips_the_official_exclusions():
    model = _Toy()
    reference = {
        name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    assert convert_linears_to_fp8(model) == 4
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name in reference}
    assert kinds == {
        "time_embedding.0": "Linear",
        "time_embedding.2": "Linear",
        "blocks.0.q": "FP8Linear",
        "blocks.0.o": "FP8Linear",
        "blocks.1.q": "FP8Linear",
        "blocks.1.o": "FP8Linear",
        "head.head": "Linear",
    }
    fp8 = model.get_submodule("blocks.1.o")
    w = reference["blocks.1.o"]
    assert torch.all(
        (fp8.dequantized_weight() - w).abs() <= w.abs() * _REL + _SUBNORMAL_ABS * fp8.weight_scale
    )
    assert "head.head" in EXCLUDED_FROM_FP8


def test_rejects_a_non_fp8_weight():
    with pytest.raises(ValueError, match="float8"):
        FP8Linear(torch.zeros(4, 4), torch.tensor(1.0), None)


def test_q_k_v_share_one_quantization_of_their_input_on_the_scaled_mm_path(monkeypatch):
    # This CPU build has a `_scaled_mm` kernel too, so the GPU path can run here once it is allowed.
    monkeypatch.setattr(fp8_linear, "scaled_mm_supported", lambda device: True)
    torch.manual_seed(0)
    attn = SelfAttention(64, num_heads=4).to(torch.bfloat16)
    assert convert_linears_to_fp8(attn) == 4  # q, k, v, o
    x = torch.randn(2, 5, 64).bfloat16()
    quantized = []
    real = fp8_linear.quantize_per_tensor
    monkeypatch.setattr(
        fp8_linear, "quantize_per_tensor", lambda t: quantized.append(tuple(t.shape)) or real(t)
    )

    q, k, v = attn.project(x)
    assert quantized == [(10, 64)]  # once for the three projections

    quantized.clear()
    alone = [layer(x) for layer in (attn.q, attn.k, attn.v)]
    assert len(quantized) == 3  # each layer by itself quantizes its input
    heads = (4, 16)
    assert torch.equal(q, attn.norm_q(alone[0]).unflatten(-1, heads))
    assert torch.equal(k, attn.norm_k(alone[1]).unflatten(-1, heads))
    assert torch.equal(v, alone[2].unflatten(-1, heads)) and v.dtype == torch.bfloat16
    # and the product is the dequantized one up to e4m3 rounding of the input and bf16 output rounding
    reference = F.linear(x.float(), attn.v.dequantized_weight(), attn.v.bias.float())
    assert ((alone[2].float() - reference).norm() / reference.norm()) < 0.05


def test_layers_without_scaled_mm_each_run_on_their_own():
    layers = [nn.Linear(8, 4), FP8Linear.from_linear(nn.Linear(8, 4))]
    x = torch.randn(3, 8)
    outputs = linears_on_shared_input(layers, x)
    assert all(torch.equal(out, layer(x)) for out, layer in zip(outputs, layers, strict=True))


class _OnFakeGPU(torch.Tensor):
    """A CPU tensor that reports `cuda:0` as its device, so that an FP8 forward asks for a GPU's capability here."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


@dataclass
class _CapabilityAsks:
    """What the fake `torch.cuda.get_device_capability` answers, and the devices it was asked about."""

    answer: tuple[int, int] = (8, 0)
    devices: list[torch.device] = field(default_factory=list)


@pytest.fixture
def capability(monkeypatch) -> _CapabilityAsks:
    """Counts CUDA capability questions, starting from an empty per-device cache."""
    asks = _CapabilityAsks()

    def fake_capability(device=None):
        asks.devices.append(torch.device(device))
        return asks.answer

    monkeypatch.setattr(fp8_linear, "_SCALED_MM_BY_DEVICE", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", fake_capability)
    return asks


def test_a_gpu_without_scaled_mm_is_asked_once_and_runs_the_exact_fallback(capability):
    capability.answer = (8, 0)  # Ampere: no e4m3 `_scaled_mm`
    torch.manual_seed(0)
    layers = [FP8Linear.from_linear(nn.Linear(32, 16)) for _ in range(3)]
    x = torch.randn(2, 5, 32)
    on_gpu = x.as_subclass(_OnFakeGPU)
    for _ in range(10):
        outputs = [layer(on_gpu) for layer in layers] + linears_on_shared_input(layers, on_gpu)
    assert capability.devices == [torch.device("cuda", 0)]  # 60 forwards, one question
    for out, layer in zip(outputs, layers + layers, strict=True):
        expected = F.linear(x, layer.dequantized_weight(), layer.bias)  # the fallback is exact
        assert torch.equal(out.as_subclass(torch.Tensor), expected)


def test_a_gpu_with_scaled_mm_is_asked_once_and_multiplies_in_fp8(capability):
    capability.answer = (9, 0)  # Hopper; this CPU build has a `_scaled_mm` kernel, so that path runs here
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(nn.Linear(32, 16).bfloat16())
    x = torch.randn(2, 5, 32).bfloat16()
    for _ in range(10):
        out = layer(x.as_subclass(_OnFakeGPU))
    assert capability.devices == [torch.device("cuda", 0)]
    assert torch.equal(out.as_subclass(torch.Tensor), layer.forward_quantized(QuantizedInput.of(x)))


def test_the_answer_is_kept_per_device_and_the_cpu_never_asks_cuda(capability):
    layer = FP8Linear.from_linear(nn.Linear(8, 4))
    for _ in range(5):
        layer(torch.randn(3, 8))
    assert capability.devices == []
    for _ in range(5):
        for device in (torch.device("cuda", 0), torch.device("cuda", 1)):
            assert fp8_linear.scaled_mm_supported(device) is False
    assert capability.devices == [torch.device("cuda", 0), torch.device("cuda", 1)]
