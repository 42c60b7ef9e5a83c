"""The statistics precision setting, and the bound on what its fast mode (TF32 inputs) does to ΔW and ε.

The bound is checked by emulation: TF32 keeps 10 of fp32's 23 mantissa bits of each GEMM input, so rounding the
inputs that way and computing G, C and s exactly (fp64) is what a TF32 GEMM computes up to its fp32 accumulation,
which the exact mode has too. Both roundings a TF32 conversion may use are tried: to nearest and towards zero.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from ispa import AttentionSession, CacheLayout, ISPAPolicy, absorption
from ispa.absorption import AbsorptionStats, solve_layer
from ispa.statistics_precision import default_statistics_precision, split_bf16, statistics_gemms

DIM, TOKENS, LAM = 128, 2048, 1e-3
TF32_MANTISSA_BITS = 10


def round_to_tf32(x: torch.Tensor, mode: str) -> torch.Tensor:
    """fp32 values rounded to TF32 (10 mantissa bits), to nearest (ties away, like cvt.rna) or towards zero."""
    bits = x.float().contiguous().view(torch.int32)
    dropped = 23 - TF32_MANTISSA_BITS
    if mode == "nearest":
        bits = bits + (1 << (dropped - 1))
    return (bits & ~((1 << dropped) - 1)).view(torch.float32)


def exact_statistics(local, gap, weight):
    local, gap, weight = (t.double() for t in (local, gap, weight))
    return local.T @ local, local.T @ gap, ((gap @ weight.T) ** 2).sum()


def bf16_activations(history: float, seed: int):
    """A bf16 model's A_loc and A_full: the history adds a mostly linear function of A_loc, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    a_loc = torch.randn(TOKENS, DIM, generator=gen).bfloat16()
    mix = torch.randn(DIM, DIM, generator=gen) / DIM**0.5
    noise = 0.1 * torch.randn(TOKENS, DIM, generator=gen)
    a_full = (a_loc.float() + history * (a_loc.float() @ mix + noise)).bfloat16()
    return a_loc, a_full


@pytest.mark.parametrize("mode", ["nearest", "towards_zero"])
@pytest.mark.parametrize("history", [0.3, 0.03])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])  # fp32: a dequantized FP8 weight
def test_tf32_statistics_move_delta_w_and_epsilon_by_at_most_the_stated_bound(mode, history, weight_dtype):
    a_loc, a_full = bf16_activations(history, seed=int(history * 100))
    weight = (torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(5)) / DIM**0.5).to(weight_dtype)
    gap = a_full.float() - a_loc.float()  # what the statistics multiply, as `AbsorptionStats.update` forms it
    G, C, s = exact_statistics(a_loc, gap, weight)
    delta, eps = solve_layer(G, C, s, weight.double(), LAM)

    local_tf32 = round_to_tf32(a_loc.float(), mode)
    assert torch.equal(local_tf32, a_loc.float())  # a bf16 A_loc is exact in TF32: G does not change
    G_fast, C_fast, s_fast = exact_statistics(
        local_tf32, round_to_tf32(gap, mode), round_to_tf32(weight, mode)
    )
    delta_fast, eps_fast = solve_layer(G_fast, C_fast, s_fast, weight.double(), LAM)

    assert float((delta_fast.double() - delta.double()).norm()) <= 2.0**-10 * float(delta.norm())
    assert abs(float(eps_fast - eps)) <= 2.0**-8 * float(s)
    # and the emulation is not a no-op: the gap really is rounded
    assert not torch.equal(round_to_tf32(gap, mode), gap)


def test_the_default_is_fast_on_cuda_and_exact_elsewhere():
    assert (
        default_statistics_precision("cuda") == default_statistics_precision(torch.device("cuda:1")) == "fast"
    )
    assert default_statistics_precision("cpu") == "exact"
    assert AbsorptionStats(1, 4, "cpu").precision == "exact"
    assert AbsorptionStats(1, 4, "cpu", precision="fast").precision == "fast"


def test_a_bad_setting_names_the_field():
    layout = CacheLayout(block_tokens=2, history_blocks=1, num_rings=1, frames_per_block=1)
    with pytest.raises(ValueError, match="statistics_precision"):
        AttentionSession(ISPAPolicy(), 2, layout, statistics_precision="tf32")
    with pytest.raises(ValueError, match="statistics_precision"):
        AbsorptionStats(1, 4, "cpu", precision="half")


@pytest.fixture
def restored_cublas_setting():
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    yield matmul
    matmul.fp32_precision = saved


@pytest.mark.parametrize(
    ("precision", "activations", "inside"),
    [
        ("fast", torch.bfloat16, "tf32"),
        ("fast", torch.float16, "tf32"),
        ("fast", torch.float32, "ieee"),  # fp32 activations would round in TF32: kept exact
        ("exact", torch.bfloat16, "ieee"),
    ],
)
def test_cuda_gemms_switch_the_cublas_setting_and_restore_it(
    restored_cublas_setting, precision, activations, inside
):
    matmul = restored_cublas_setting
    matmul.fp32_precision = "none"
    with statistics_gemms(precision, torch.device("cuda"), activations):
        assert matmul.fp32_precision == inside
    assert matmul.fp32_precision == "none"
    with pytest.raises(KeyError), statistics_gemms(precision, torch.device("cuda"), activations):
        raise KeyError("restored on errors too")
    assert matmul.fp32_precision == "none"
    with statistics_gemms(precision, torch.device("cpu"), activations):
        assert matmul.fp32_precision == "none"  # nothing to switch on a CPU


def test_update_runs_its_gemms_under_the_stats_precision(monkeypatch):
    calls = []

    @contextlib.contextmanager
    def recording(precision, device, activations):
        calls.append((precision, device, activations))
        yield

    monkeypatch.setattr(absorption, "statistics_gemms", recording)
    stats = AbsorptionStats(1, 8, "cpu", precision="fast")
    a_loc, a_full = torch.randn(5, 8).bfloat16(), torch.randn(5, 8).bfloat16()
    stats.update(0, a_loc, a_full, torch.randn(8, 8))
    assert calls == [("fast", torch.device("cpu"), torch.bfloat16)]


# ---- "bf16": bf16 GEMMs with fp32 output, the gap split hi/lo (issue 20 §3a)
BF16_DELTA_W_BOUND, BF16_EPSILON_BOUND = 2.0**-14, 2.0**-7  # stated in ispa/statistics_precision.py


@pytest.mark.parametrize("history", [0.3, 0.03])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])  # fp32: a dequantized FP8 weight
def test_bf16_statistics_stay_within_the_stated_bound_of_the_exact_solve(history, weight_dtype):
    a_loc, a_full = bf16_activations(history, seed=int(history * 100) + 1)
    weight = (torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(6)) / DIM**0.5).to(weight_dtype)
    G, C, s = exact_statistics(a_loc, a_full.float() - a_loc.float(), weight)
    delta, eps = solve_layer(G, C, s, weight.double(), LAM)
    stats = AbsorptionStats(1, DIM, "cpu", precision="bf16")
    for rows in torch.arange(TOKENS).chunk(4):  # several forwards
        stats.update(0, a_loc[rows], a_full[rows], weight)
    delta_bf16, eps_bf16 = solve_layer(
        stats.G(0).double(), stats.C(0).double(), stats.s(0), weight.double(), LAM
    )
    assert float((delta_bf16.double() - delta.double()).norm()) <= BF16_DELTA_W_BOUND * float(delta.norm())
    assert abs(float(eps_bf16 - eps)) <= BF16_EPSILON_BOUND * float(s)
    torch.testing.assert_close(stats.G(0).double(), G, rtol=1e-5, atol=1e-3)  # exact products, fp32 sums
    assert stats.count(0) == TOKENS


def test_the_hi_lo_split_keeps_16_bits_where_bf16_alone_keeps_8():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(7))
    hi, lo = split_bf16(x)
    assert hi.dtype == lo.dtype == torch.bfloat16
    relative = ((hi.float() + lo.float()) - x).abs() / x.abs()
    assert float(relative.max()) <= 2.0**-16
    assert float(((hi.float() - x).abs() / x.abs()).max()) > 2.0**-10  # hi alone would not do


def test_bf16_mode_with_other_activations_takes_the_fast_path(monkeypatch):
    calls = []

    @contextlib.contextmanager
    def recording(precision, device, activations):
        calls.append((precision, activations))
        yield

    monkeypatch.setattr(absorption, "statistics_gemms", recording)
    stats = AbsorptionStats(1, 8, "cpu", precision="bf16")
    stats.update(0, torch.randn(5, 8), torch.randn(5, 8), torch.randn(8, 8))  # fp32: the fp32 path
    stats.update(
        0, torch.randn(5, 8).bfloat16(), torch.randn(5, 8).bfloat16(), torch.randn(8, 8)
    )  # bf16 GEMMs
    assert calls == [("bf16", torch.float32)]
    assert stats.count(0) == 10
