"""The absorb's ridge solve of one layer straight from its statistics, with about 20 D² bytes of workspace.

`solve_layer(stats.G(layer), ...)` holds, at its largest moment, the rebuilt fp32 G, G + lam I in fp64, its
Cholesky factor, C and W in fp64 and C W: 44 D² bytes (1.07 GiB at D = 5120, measured on live tensors). Here G
goes straight from the statistics' triangle into one fp64 matrix that the Cholesky factorisation overwrites, C W
is built panel by panel into one fp64 matrix, and the two triangular solves, ΔW and the error run one panel of
output columns at a time: the fp64 factor and C W (16 D²), ΔW in fp32 (4 D²) and panels. The arithmetic is the
same as `solve_layer`'s (a Cholesky solve is its two triangular solves), up to fp64 rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ispa.absorption import AbsorptionStats, _check_solve_inputs

__all__ = ["SOLVE_PANEL", "solve_layer_lean"]

SOLVE_PANEL = 512  # columns (and rows) per panel: 21 MB of fp64 at D = 5120


@torch.no_grad()
def solve_layer_lean(
    stats: AbsorptionStats, layer: int, weight: Tensor, lam: float, panel: int | None = None
) -> tuple[Tensor, Tensor]:
    """(delta_weight [D_out, D] fp32, eps 0-dim fp64) of `layer`, as `solve_layer` gives them, without a host
    sync; eps is NaN when G + lam I is not positive definite. `panel`: rows and columns per panel (default
    `SOLVE_PANEL`)."""
    panel = SOLVE_PANEL if panel is None else panel
    if panel < 1:
        raise ValueError(f"panel must be a positive number of rows, got {panel}")
    dim = stats.dim
    C = stats.C(layer)
    device = C.device
    if weight.ndim != 2 or weight.shape[1] != dim:
        raise ValueError(f"weight must be [D_out, {dim}], got {tuple(weight.shape)}")
    _check_solve_inputs(C, C, weight, lam)  # lam and shapes; G is C's shape by construction
    # Filled through its transpose: a column-major matrix, the layout the factorisation writes in place.
    system = torch.empty(dim, dim, dtype=torch.float64, device=device).mT
    stats.gram_into(layer, system, panel)
    system.diagonal().add_(lam)
    info = torch.empty((), dtype=torch.int32, device=device)
    factor, info = torch.linalg.cholesky_ex(system, out=(system, info))  # lower factor, in place

    d_out = weight.shape[0]
    target = torch.empty(dim, d_out, dtype=torch.float64, device=device)  # C W = C @ weight.T
    for rows in range(0, dim, panel):
        c_rows = C[rows : rows + panel].to(torch.float64)
        for cols in range(0, d_out, panel):
            w_cols = weight[cols : cols + panel].to(device=device, dtype=torch.float64)
            torch.mm(c_rows, w_cols.T, out=target[rows : rows + panel, cols : cols + panel])

    delta_weight = torch.empty(d_out, dim, dtype=torch.float32, device=device)
    along_target = torch.zeros((), dtype=torch.float64, device=device)
    squared = torch.zeros((), dtype=torch.float64, device=device)
    for cols in range(0, d_out, panel):
        right = target[:, cols : cols + panel]
        half = torch.linalg.solve_triangular(factor, right, upper=False)
        solution = torch.linalg.solve_triangular(factor.mT, half, upper=True)  # dW[:, cols]
        del half
        along_target += (solution * right).sum()
        squared += solution.square().sum()
        delta_weight[cols : cols + panel].copy_(solution.T)
    s = stats.s(layer).to(device=device, dtype=torch.float64)
    eps = s - along_target - lam * squared
    eps = torch.where(info == 0, eps, torch.full_like(eps, math.nan))
    return delta_weight, eps
