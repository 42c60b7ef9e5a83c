"""An L-layer applies the ΔW the absorb solved for, to ≤ 1 % (relative Frobenius), in bf16 and FP8 models alike.

How the applied change is measured, independently of how the projection stores it: the base weight is built with
duplicated columns, W = [V, V], so every probe x_i = e_i - e_{i+m} has W x_i = 0 exactly, in any format (an FP8
weight quantizes both copies of a column the same way). The projection's output on x_i is then the change alone,
x_i ΔWᵀ = ΔW[:, i] - ΔW[:, i+m], free of the rounding of the much larger base output. Merging ΔW into one weight
(re-quantized to e4m3, or rounded to bf16) fails this by up to 99 % at ‖ΔW‖/‖W‖ = 1e-3.
"""

import pytest
import torch
from torch import nn

from avatars.liveavatar.fp8_linear import FP8Linear
from ispa.projection import DeltaProjection

D_OUT, HALF = 96, 128  # D = 2 * HALF inputs
RATIOS = (1e-3, 1e-2, 1e-1, 1.0)
BOUND = 0.01


def duplicated_column_linear(dtype: torch.dtype) -> nn.Linear:
    generator = torch.Generator().manual_seed(0)
    half = torch.randn(D_OUT, HALF, generator=generator) / HALF**0.5
    linear = nn.Linear(2 * HALF, D_OUT, bias=False)
    linear.weight = nn.Parameter(torch.cat((half, half), dim=1).to(dtype), requires_grad=False)
    return linear


def scaled_delta(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    return delta * (ratio * weight.double().norm() / delta.norm()).float()


def null_space_probes(dtype: torch.dtype) -> torch.Tensor:
    eye = torch.eye(HALF)
    return torch.cat((eye, -eye), dim=1).to(dtype)  # [HALF, 2 * HALF], W x_i = 0 for every row


def relative_error(measured: torch.Tensor, expected: torch.Tensor) -> float:
    return float((measured.double() - expected).norm() / expected.norm())


def build(model: str) -> tuple[nn.Module, torch.dtype]:
    linear = duplicated_column_linear(torch.bfloat16)
    if model == "fp8":
        return FP8Linear.from_linear(linear), torch.bfloat16
    return linear, torch.bfloat16


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("model", ["bf16", "fp8"])
def test_the_applied_weight_change_is_delta_w_within_one_percent(model, ratio):
    out_proj, activations = build(model)
    probes = null_space_probes(activations)
    assert torch.equal(out_proj(probes), torch.zeros(HALF, D_OUT, dtype=activations))  # the probes see W = 0

    delta = scaled_delta(out_proj.weight if model == "bf16" else out_proj.dequantized_weight(), ratio)
    projection = DeltaProjection(out_proj, delta)
    applied = projection(probes)  # = x_i (applied change)ᵀ, the base part being exactly 0
    expected = probes.double() @ delta.double().T
    assert applied.dtype == activations
    assert relative_error(applied, expected) <= BOUND
    assert relative_error(projection.delta_weight, delta.double()) <= BOUND  # over the whole input space too


@pytest.mark.parametrize("model", ["bf16", "fp8"])
def test_the_projection_is_the_base_output_plus_the_change(model):
    out_proj, activations = build(model)
    delta = scaled_delta(out_proj.weight if model == "bf16" else out_proj.dequantized_weight(), 0.05)
    projection = DeltaProjection(out_proj, delta)
    x = torch.randn(2, 7, 2 * HALF, generator=torch.Generator().manual_seed(2)).to(activations)
    reference = out_proj(x).double() + x.double() @ projection.delta_weight.double().T
    y = projection(x)
    assert y.shape == (2, 7, D_OUT) and y.dtype == activations
    # one bf16 rounding of the output (2^-9 relative) is all that separates it from the exact sum
    assert torch.all((y.double() - reference).abs() <= reference.abs() * 2.0**-8 + 1e-6)


def test_fp32_models_keep_an_fp32_change_and_the_module_is_left_alone():
    linear = nn.Linear(16, 8)
    before = linear.weight.detach().clone()
    delta = 1e-4 * torch.randn(8, 16)
    projection = DeltaProjection(linear, delta)
    assert projection.delta_weight.dtype == torch.float32 and projection.nbytes() == 8 * 16 * 4
    x = torch.randn(5, 16)
    torch.testing.assert_close(projection(x), x @ (before + delta).T + linear.bias, rtol=1e-6, atol=1e-6)
    assert torch.equal(linear.weight, before)
    with pytest.raises(ValueError, match="delta_weight shape"):
        DeltaProjection(linear, torch.zeros(16, 8))
