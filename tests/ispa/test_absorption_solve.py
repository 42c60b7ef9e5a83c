"""Streaming statistics, the ridge solve and the error formula against direct computations on the activations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ispa import (
    AbsorptionStats,
    absorption,
    reconstruction_error,
    select_local_layers,
    solve_delta,
    solve_layer,
    statistics_nbytes,
)

DIM, DIM_OUT, LAM = 12, 10, 1e-3


def activation_chunks(seed: int, shapes=((3, 7), (20,), (2, 2, 5))):
    """Pairs (a_loc, a_full) with assorted leading dims; a_full = a_loc + a correlated gap."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(DIM, DIM, generator=gen) * 0.3
    chunks = []
    for lead in shapes:
        a_loc = torch.randn(*lead, DIM, generator=gen)
        a_full = a_loc + a_loc @ mixing + 0.1 * torch.randn(*lead, DIM, generator=gen)
        chunks.append((a_loc, a_full))
    return chunks


def stacked(chunks):
    a_loc = torch.cat([a.reshape(-1, DIM) for a, _ in chunks]).double()
    a_full = torch.cat([b.reshape(-1, DIM) for _, b in chunks]).double()
    return a_loc, a_full


def weight(seed: int = 7):
    return torch.randn(DIM_OUT, DIM, generator=torch.Generator().manual_seed(seed))


def accumulate(chunks, w, dtype=torch.float32):
    stats = AbsorptionStats(num_layers=2, dim=DIM, device="cpu", dtype=dtype)
    for a_loc, a_full in chunks:
        stats.update(1, a_loc, a_full, w)
    return stats


def relative(x, y) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_streaming_statistics_equal_the_stacked_products(dtype, tolerance):
    chunks = activation_chunks(0)
    w = weight()
    stats = accumulate(chunks, w, dtype)
    a_loc, a_full = stacked(chunks)
    residual = (a_full - a_loc) @ w.double().T
    assert relative(stats.G(1), a_loc.T @ a_loc) <= tolerance
    assert relative(stats.C(1), a_loc.T @ (a_full - a_loc)) <= tolerance
    assert (
        abs(stats.s(1).item() - residual.square().sum().item()) / residual.square().sum().item() <= tolerance
    )
    assert stats.count(1) == a_loc.shape[0] and stats.count(0) == 0
    assert stats.G(1).dtype == dtype


@pytest.mark.parametrize("panel_rows", [5, 12, 512])
def test_paired_triangles_keep_every_layers_gram_matrix_exact(monkeypatch, panel_rows):
    """Three layers: 0 and 1 share one G buffer (lower / upper half), 2 has one alone; panels of 5 rows end mid-way."""
    monkeypatch.setattr(absorption, "_GRAM_PANEL_ROWS", panel_rows)
    w = weight()
    stats = AbsorptionStats(num_layers=3, dim=DIM, device="cpu", dtype=torch.float64)
    data = {layer: activation_chunks(10 + layer) for layer in range(3)}
    for step in range(3):  # interleaved, as a forward pass visits the layers
        for layer in range(3):
            stats.update(layer, *data[layer][step], w)
    for layer in range(3):
        a_loc, a_full = stacked(data[layer])
        assert relative(stats.G(layer), a_loc.T @ a_loc) <= 1e-12, layer
        assert torch.equal(stats.G(layer), stats.G(layer).T)
        assert relative(stats.C(layer), a_loc.T @ (a_full - a_loc)) <= 1e-12, layer
    assert stats.nbytes() == statistics_nbytes(3, DIM, torch.float64)


def test_a_restarted_layer_starts_from_zero_and_leaves_its_partner_alone():
    w = weight()
    stats = AbsorptionStats(num_layers=2, dim=DIM, device="cpu", dtype=torch.float64)
    first, second, third = activation_chunks(20), activation_chunks(21), activation_chunks(22)
    for layer, chunks in ((0, first), (1, second)):
        for a_loc, a_full in chunks:
            stats.update(layer, a_loc, a_full, w)
    for layer in (1, 0):  # the odd layer first, then the even one
        stats.free(layer)
        for a_loc, a_full in third:
            stats.update(layer, a_loc, a_full, w)
        partner_data = first if layer == 1 else third
        a_loc, _ = stacked(partner_data)
        assert relative(stats.G(1 - layer), a_loc.T @ a_loc) <= 1e-12
    a_loc, _ = stacked(third)
    for layer in (0, 1):
        assert relative(stats.G(layer), a_loc.T @ a_loc) <= 1e-12
    assert stats.nbytes() == statistics_nbytes(2, DIM, torch.float64)


@pytest.mark.parametrize(("num_layers", "dim"), [(1, 7), (2, 12), (5, 3), (40, 5120)])
def test_statistics_nbytes_is_the_layout_arithmetic(num_layers, dim):
    pairs, odd_layers = (num_layers + 1) // 2, num_layers // 2
    expected = 4 * (pairs * dim * dim + odd_layers * dim + num_layers * dim * dim + num_layers)
    assert statistics_nbytes(num_layers, dim) == expected
    if dim == 5120:  # LiveAvatar 14B: 1.5 D^2 per layer instead of 2 D^2
        assert f"{expected / 1e9:.2f}" == "6.29"


def test_solve_layer_gives_solve_delta_and_the_error_without_extra_products():
    chunks = activation_chunks(6)
    w = weight()
    stats = accumulate(chunks, w, torch.float64)
    delta, eps = solve_layer(stats.G(1), stats.C(1), stats.s(1), w, LAM)
    assert torch.equal(delta, solve_delta(stats.G(1), stats.C(1), w, LAM))
    assert eps.dtype == torch.float64 and eps.ndim == 0
    a_loc, a_full = stacked(chunks)
    direct = (F.linear(a_loc, w.double() + delta.double()) - F.linear(a_full, w.double())).square().sum()
    assert abs(eps.item() - direct.item()) / direct.item() <= 1e-9
    assert eps.item() == pytest.approx(
        reconstruction_error(stats.G(1), stats.C(1), stats.s(1), delta, w), rel=1e-9
    )
    _, eps_from_float = solve_layer(stats.G(1), stats.C(1), stats.s(1).item(), w, LAM)
    assert eps_from_float.item() == pytest.approx(eps.item(), rel=1e-12)


def test_solve_layer_reports_nan_when_g_is_not_positive_definite():
    negative = -torch.eye(DIM, dtype=torch.float64)
    _, eps = solve_layer(negative, torch.zeros(DIM, DIM), torch.tensor(1.0), weight(), LAM)
    assert math.isnan(eps.item())
    with pytest.raises(ValueError, match="lam"):
        solve_layer(torch.eye(DIM), torch.eye(DIM), 0.0, weight(), -1.0)


def direct_ridge_solution(a_loc, a_full, w, lam):
    """argmin_X ||a_loc X - R||^2 + lam ||X||^2 via least squares on the augmented system, in fp64."""
    target = (a_full - a_loc) @ w.double().T  # R = (A_full - A_loc) W with W = weight.T
    augmented = torch.cat([a_loc, math.sqrt(lam) * torch.eye(DIM, dtype=torch.float64)])
    padded = torch.cat([target, torch.zeros(DIM, target.shape[1], dtype=torch.float64)])
    return torch.linalg.lstsq(augmented, padded).solution  # paper's dW, [D, D_out]


@pytest.mark.parametrize("lam", [LAM, 0.5])
def test_solve_delta_matches_direct_least_squares(lam):
    chunks = activation_chunks(1)
    w = weight()
    stats = accumulate(chunks, w, torch.float64)
    delta = solve_delta(stats.G(1), stats.C(1), w, lam)
    a_loc, a_full = stacked(chunks)
    expected = direct_ridge_solution(a_loc, a_full, w, lam)
    assert delta.shape == (DIM_OUT, DIM) and delta.dtype == torch.float32
    assert relative(delta.T, expected) <= 1e-6  # Linear convention: delta_weight is dW transposed


def test_solve_delta_from_fp32_statistics_is_close_to_the_exact_solution():
    chunks = activation_chunks(2)
    w = weight()
    stats = accumulate(chunks, w)
    delta = solve_delta(stats.G(1), stats.C(1), w, LAM)
    a_loc, a_full = stacked(chunks)
    assert relative(delta.T, direct_ridge_solution(a_loc, a_full, w, LAM)) <= 1e-4


def test_epsilon_from_statistics_equals_epsilon_from_activations():
    chunks = activation_chunks(3)
    w = weight()
    stats = accumulate(chunks, w, torch.float64)
    delta = solve_delta(stats.G(1), stats.C(1), w, LAM)
    eps = reconstruction_error(stats.G(1), stats.C(1), stats.s(1), delta, w)
    a_loc, a_full = stacked(chunks)
    # ||A_loc (W + dW) - A_full W||^2 in Linear form: ||F.linear(A_loc, weight + delta) - F.linear(A_full, weight)||^2
    direct = (
        (F.linear(a_loc, w.double() + delta.double()) - F.linear(a_full, w.double())).square().sum().item()
    )
    assert abs(eps - direct) / direct <= 1e-6
    # and without the update the error is the full residual s
    assert (
        abs(
            reconstruction_error(stats.G(1), stats.C(1), stats.s(1), torch.zeros_like(w), w)
            - stats.s(1).item()
        )
        <= 1e-9
    )


def test_an_exactly_linear_history_is_absorbed_completely():
    """If A_full = A_loc M, the updated Linear maps A_loc to the full output (bias untouched)."""
    gen = torch.Generator().manual_seed(4)
    a_loc = torch.randn(200, DIM, generator=gen, dtype=torch.float64)
    mixing = torch.eye(DIM, dtype=torch.float64) + 0.2 * torch.randn(
        DIM, DIM, generator=gen, dtype=torch.float64
    )
    a_full = a_loc @ mixing
    linear = torch.nn.Linear(DIM, DIM_OUT).double()
    stats = AbsorptionStats(1, DIM, "cpu", torch.float64)
    stats.update(0, a_loc, a_full, linear.weight)
    delta = solve_delta(stats.G(0), stats.C(0), linear.weight.detach(), 1e-9)
    absorbed = F.linear(a_loc, linear.weight + delta.double(), linear.bias)
    assert relative(absorbed, linear(a_full)) <= 1e-6
    eps = reconstruction_error(stats.G(0), stats.C(0), stats.s(0), delta, linear.weight.detach())
    assert abs(eps) <= 1e-8 * stats.s(0).item()


def test_stats_bytes_count_live_tensors_and_free_releases_them():
    stats = AbsorptionStats(3, DIM, "cpu")
    assert stats.nbytes() == 0
    a_loc, a_full = activation_chunks(5)[0]
    stats.update(0, a_loc, a_full, weight())
    stats.update(2, a_loc, a_full, weight())
    assert stats.nbytes() == 2 * (2 * DIM * DIM * 4 + 4)
    stats.free(0)
    assert stats.nbytes() == 2 * DIM * DIM * 4 + 4 and stats.count(0) == 0
    with pytest.raises(RuntimeError, match="no statistics"):
        stats.G(0)
    stats.free()
    assert stats.nbytes() == 0


def test_stats_reject_bad_shapes():
    stats = AbsorptionStats(2, DIM, "cpu")
    a = torch.zeros(4, DIM)
    with pytest.raises(ValueError):
        stats.update(0, a, torch.zeros(5, DIM), weight())
    with pytest.raises(ValueError):
        stats.update(0, torch.zeros(4, DIM + 1), torch.zeros(4, DIM + 1), weight())
    with pytest.raises(ValueError):
        stats.update(0, a, a, torch.zeros(DIM_OUT, DIM + 1))
    with pytest.raises(ValueError):
        stats.update(2, a, a, weight())


def test_solve_delta_rejects_bad_input():
    g = torch.eye(DIM)
    with pytest.raises(ValueError, match="lam"):
        solve_delta(g, g, weight(), 0.0)
    with pytest.raises(ValueError, match="lam"):
        solve_delta(g, g, weight(), math.nan)
    with pytest.raises(ValueError):
        solve_delta(torch.eye(DIM + 1), g, weight(), LAM)
    with pytest.raises(ValueError):
        solve_delta(g, g, torch.zeros(DIM), LAM)


def test_select_local_layers_picks_the_k_smallest_with_ties_by_index():
    eps = [0.5, 0.1, 0.3, 0.1, math.inf, 0.3]
    assert select_local_layers(eps, 3) == [1, 2, 3]
    assert select_local_layers(eps, 4) == [1, 2, 3, 5]
    assert select_local_layers(eps, 0) == []
    assert select_local_layers(eps, 6) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        select_local_layers(eps, 7)
    with pytest.raises(ValueError):
        select_local_layers(eps, -1)
    with pytest.raises(ValueError, match="NaN"):
        select_local_layers([0.1, math.nan], 1)
