"""Absorbing a layer's history into its output projection (ISPA paper, Sections 3.2-3.3).

Per layer, the ridge problem  min_dW ||A_loc (W + dW) - A_full W||^2 + lam ||dW||^2  has the closed form
dW = (G + lam I)^-1 C W with the streaming statistics

    G = sum A_loc^T A_loc,   C = sum A_loc^T (A_full - A_loc),   s = sum ||(A_full - A_loc) W||^2,

and its residual is  eps = tr(dW^T G dW) - 2 tr(dW^T C W) + s.  Only G, C and s are kept, never the activations.
A is the attention output before the projection, flattened over heads ([tokens, D]); W is the paper's projection
matrix, i.e. `weight.T` for a PyTorch Linear (`y = x @ weight.T + bias`), so the update is returned as
`delta_weight = dW.T` and the new layer computes `x @ (weight + delta_weight).T + bias`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ispa.statistics_precision import (
    StatisticsPrecision,
    bf16_gemm,
    check_statistics_precision,
    default_statistics_precision,
    split_bf16,
    statistics_gemms,
)

__all__ = [
    "AbsorptionStats",
    "StatisticsReducer",
    "reconstruction_error",
    "select_local_layers",
    "solve_delta",
    "solve_layer",
    "statistics_nbytes",
]

# Sums a list of tensors in place over the processes sharing a run (see `AbsorptionStats.sum_across`).
StatisticsReducer = Callable[[list[Tensor]], None]

# Rows of G per product: smaller panels skip more of the upper triangle but run smaller GEMMs.
_GRAM_PANEL_ROWS = 512


class AbsorptionStats:
    """Streaming G, C, s per layer, allocated on a layer's first update.

    Memory layout. G is symmetric, so only its lower triangle is accumulated, and two layers share one D x D buffer:
    layer 2i keeps its lower triangle (diagonal included) in the buffer's lower triangle, layer 2i+1 keeps its
    lower triangle transposed in the buffer's strict upper triangle and its diagonal in a D-vector. C is not
    symmetric and takes a full D x D per layer. Per layer that is 1.5 D^2 + O(D) values instead of 2 D^2: at
    D = 5120 over 40 layers, 6.29 GB instead of 8.39 GB in fp32 (`statistics_nbytes`). Only the lower triangle's
    row panels are multiplied, which also saves about 45 % of G's FLOPs. Every sum is the same as with full
    matrices (the same products, accumulated in `dtype`), so the statistics stay exact; `G(layer)` returns the
    full symmetric matrix.
    """

    def __init__(
        self,
        num_layers: int,
        dim: int,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        precision: StatisticsPrecision | None = None,
    ):
        if num_layers < 1 or dim < 1:
            raise ValueError(f"num_layers and dim must be positive, got {num_layers} and {dim}")
        if not dtype.is_floating_point:
            raise ValueError(f"statistics need a floating dtype, got {dtype}")
        self.num_layers = num_layers
        self.dim = dim
        self.device = torch.device(device)
        self.dtype = dtype
        self.precision = (
            default_statistics_precision(self.device)
            if precision is None
            else check_statistics_precision(precision)
        )
        self._G_pairs: list[Tensor | None] = [None] * ((num_layers + 1) // 2)  # shared by layers 2i and 2i+1
        self._G_diagonal: list[Tensor | None] = [None] * num_layers  # only odd layers use theirs
        self._C: list[Tensor | None] = [None] * num_layers
        self._s: list[Tensor | None] = [None] * num_layers
        self._count = [0] * num_layers

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _start(self, layer: int) -> None:
        pair = layer // 2
        if self._G_pairs[pair] is None:
            self._G_pairs[pair] = self._zeros(self.dim, self.dim)
        if layer % 2:
            self._G_diagonal[layer] = self._zeros(self.dim)
        self._C[layer] = self._zeros(self.dim, self.dim)
        self._s[layer] = self._zeros()

    @torch.no_grad()
    def update(self, layer: int, a_loc: Tensor, a_full: Tensor, weight: Tensor) -> None:
        """Add one forward's activations. a_loc/a_full: [..., D] (leading dims are tokens); weight: [D_out, D].

        The GEMMs run at `self.precision` (see `ispa.statistics_precision`).
        """
        self._check_layer(layer)
        if a_loc.shape != a_full.shape or a_loc.shape[-1] != self.dim:
            raise ValueError(
                f"a_loc and a_full must both be [..., {self.dim}], got {tuple(a_loc.shape)} and {tuple(a_full.shape)}"
            )
        if weight.ndim != 2 or weight.shape[1] != self.dim:
            raise ValueError(f"weight must be [D_out, {self.dim}], got {tuple(weight.shape)}")
        if self._C[layer] is None:
            self._start(layer)
        if self.precision == "bf16" and a_loc.dtype == torch.bfloat16 and self.dtype == torch.float32:
            self._update_bf16(layer, a_loc, a_full, weight)
            return
        local = a_loc.detach().reshape(-1, self.dim).to(device=self.device, dtype=self.dtype)
        gap = a_full.detach().reshape(-1, self.dim).to(device=self.device, dtype=self.dtype) - local
        with statistics_gemms(self.precision, self.device, a_loc.dtype):
            self._add_gram(layer, local)
            self._C[layer].addmm_(local.T, gap)
            residual = (
                gap @ weight.detach().to(device=self.device, dtype=self.dtype).T
            )  # R = (A_full - A_loc) W
        self._s[layer].add_(residual.square().sum())
        self._count[layer] += local.shape[0]

    def _update_bf16(self, layer: int, a_loc: Tensor, a_full: Tensor, weight: Tensor) -> None:
        """`update` as bf16 GEMMs with fp32 output: G exact products, C and s through the gap's hi/lo split
        (`ispa.statistics_precision`)."""
        local = a_loc.detach().reshape(-1, self.dim).to(self.device)
        full = a_full.detach().reshape(-1, self.dim).to(self.device)
        hi, lo = split_bf16(full.float() - local.float())
        self._add_gram(layer, local, bf16_gemm)
        self._C[layer].add_(bf16_gemm(local.T, hi)).add_(bf16_gemm(local.T, lo))
        w = weight.detach().to(device=self.device, dtype=torch.bfloat16).T
        residual = bf16_gemm(
            hi, w
        )  # s only ranks the layers: hi's 8 bits, like the weight's, do (the bound holds)
        self._s[layer].add_(residual.square().sum())
        self._count[layer] += local.shape[0]

    def _add_gram(
        self, layer: int, local: Tensor, gemm: Callable[[Tensor, Tensor], Tensor] | None = None
    ) -> None:
        """Add the lower triangle of local^T local to the layer's half of its pair buffer, one row panel at a time
        (with `gemm`, each product is `gemm`'s, added; without, the buffer's own dtype's, accumulated in place)."""
        buffer = self._G_pairs[layer // 2]
        upper = layer % 2 == 1
        for start in range(0, self.dim, _GRAM_PANEL_ROWS):
            stop = min(start + _GRAM_PANEL_ROWS, self.dim)
            rows = local[:, start:stop]
            # Off-diagonal panel G[start:stop, :start], accumulated in place (transposed for the upper layer).
            if start > 0:
                if upper:
                    _accumulate(buffer[:start, start:stop], local[:, :start].T, rows, gemm)
                else:
                    _accumulate(buffer[start:stop, :start], rows.T, local[:, :start], gemm)
            # Diagonal block: only its lower triangle belongs to this layer.
            block = rows.T @ rows if gemm is None else gemm(rows.T, rows)
            if upper:
                buffer[start:stop, start:stop].add_(block.tril(-1).T)
                self._G_diagonal[layer][start:stop].add_(block.diagonal())
            else:
                buffer[start:stop, start:stop].add_(block.tril())

    def _get(self, store: list[Tensor | None], layer: int) -> Tensor:
        self._check_layer(layer)
        value = store[layer]
        if value is None:
            raise RuntimeError(f"layer {layer} has no statistics yet")
        return value

    def G(self, layer: int) -> Tensor:
        """Sum of A_loc^T A_loc, [D, D] (a new full symmetric matrix built from the stored triangle)."""
        self._get(self._C, layer)  # raises if the layer has no statistics
        buffer = self._G_pairs[layer // 2]
        # The layer's lower triangle, diagonal included, rebuilt from whichever half of the buffer it owns.
        lower = buffer.triu(1).T + torch.diag(self._G_diagonal[layer]) if layer % 2 else buffer.tril()
        return lower + lower.tril(-1).T

    def gram_into(self, layer: int, out: Tensor, panel_rows: int = _GRAM_PANEL_ROWS) -> Tensor:
        """Write the full symmetric G of `layer` into `out` ([D, D], any float dtype, e.g. fp64 for the solve), one
        row panel at a time: no D x D temporary, unlike `G(layer)`."""
        self._get(self._C, layer)
        _check_square("out", out, self.dim)
        buffer = self._G_pairs[layer // 2]
        odd = layer % 2 == 1
        for start in range(0, self.dim, panel_rows):
            stop = min(start + panel_rows, self.dim)
            # G[start:stop, :start] (below the diagonal block): stored as is, or transposed for an odd layer
            below = buffer[:start, start:stop].T if odd else buffer[start:stop, :start]
            out[start:stop, :start].copy_(below)
            out[:start, start:stop].copy_(below.T)
            block = buffer[start:stop, start:stop]
            lower = block.triu(1).T + torch.diag(self._G_diagonal[layer][start:stop]) if odd else block.tril()
            out[start:stop, start:stop].copy_(lower + lower.tril(-1).T)
        return out

    def C(self, layer: int) -> Tensor:
        """Sum of A_loc^T (A_full - A_loc), [D, D]."""
        return self._get(self._C, layer)

    def s(self, layer: int) -> Tensor:
        """Sum of ||(A_full - A_loc) W||^2, a 0-dim tensor."""
        return self._get(self._s, layer)

    def count(self, layer: int) -> int:
        """Tokens accumulated for `layer`."""
        self._check_layer(layer)
        return self._count[layer]

    def sum_across(self, reduce_sum: StatisticsReducer) -> None:
        """Replace every sum by its total over the processes that share one run, via `reduce_sum`.

        `reduce_sum` gets a list of tensors and must sum each in place over the processes (an all-reduce): the
        token counts first (float64, exact up to 2^53), then every allocated buffer in a fixed order. Every
        process must hold statistics for the same layers, as ranks that split one run's forwards between them do.
        """
        counts = torch.tensor(self._count, dtype=torch.float64, device=self.device)
        stores = (*self._G_pairs, *self._G_diagonal, *self._C, *self._s)
        reduce_sum([counts, *(t for t in stores if t is not None)])
        self._count = [int(c) for c in counts.tolist()]

    def nbytes(self) -> int:
        stores = (*self._G_pairs, *self._G_diagonal, *self._C, *self._s)
        return sum(t.nbytes for t in stores if t is not None)

    def free(self, layer: int | None = None) -> None:
        """Drop the statistics of one layer, or of all layers."""
        layers = range(self.num_layers) if layer is None else [layer]
        for index in layers:
            self._check_layer(index)
            self._release(index)

    def _release(self, layer: int) -> None:
        if self._C[layer] is None:
            return
        pair = layer // 2
        partner = layer ^ 1
        if partner < self.num_layers and self._C[partner] is not None:
            # The partner still accumulates in the other half: zero ours in place, so a restart begins at 0.
            if layer % 2:
                self._G_pairs[pair].tril_()
            else:
                self._G_pairs[pair].triu_(1)
        else:
            self._G_pairs[pair] = None
        self._G_diagonal[layer] = self._C[layer] = self._s[layer] = None
        self._count[layer] = 0


def _accumulate(
    target: Tensor, a: Tensor, b: Tensor, gemm: Callable[[Tensor, Tensor], Tensor] | None
) -> None:
    if gemm is None:
        target.addmm_(a, b)
    else:
        target.add_(gemm(a, b))


def statistics_nbytes(num_layers: int, dim: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes `AbsorptionStats` holds once every layer has statistics: G pair buffers, odd layers' diagonals, C, s."""
    values = (num_layers + 1) // 2 * dim * dim + num_layers // 2 * dim + num_layers * (dim * dim + 1)
    return values * dtype.itemsize


def _check_square(name: str, matrix: Tensor, dim: int) -> None:
    if matrix.shape != (dim, dim):
        raise ValueError(f"{name} must be [{dim}, {dim}], got {tuple(matrix.shape)}")


def _check_solve_inputs(G: Tensor, C: Tensor, weight: Tensor, lam: float) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be [D_out, D], got {tuple(weight.shape)}")
    dim = weight.shape[1]
    _check_square("G", G, dim)
    _check_square("C", C, dim)
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a positive finite number, got {lam}")


def _ridge_solve(G: Tensor, C: Tensor, weight: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dW [D, D_out], C W [D, D_out], Cholesky info) in fp64; info != 0 means G + lam I is not positive definite."""
    regularised = G.to(torch.float64, copy=True)
    regularised.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(regularised)
    target = C.to(torch.float64) @ weight.to(torch.float64).T  # C W = A_loc^T R, [D, D_out]
    return torch.cholesky_solve(target, factor), target, info


@torch.no_grad()
def solve_delta(G: Tensor, C: Tensor, weight: Tensor, lam: float) -> Tensor:
    """The ridge update of a Linear's weight, delta_weight = ((G + lam I)^-1 C weight^T)^T, [D_out, D] fp32.

    Solved by Cholesky in fp64: lam (1e-3) is tiny against G's scale (a sum over tens of thousands of tokens), so G +
    lam I can be ill-conditioned in fp32, while fp64 costs one D x D factorisation per layer once per warmup.
    """
    _check_solve_inputs(G, C, weight, lam)
    delta_w, _, info = _ridge_solve(G, C, weight, lam)
    if int(info) != 0:
        raise RuntimeError(f"G + lam I is not positive definite (Cholesky failed at minor {int(info)})")
    return delta_w.T.to(torch.float32).contiguous()


@torch.no_grad()
def solve_layer(G: Tensor, C: Tensor, s: Tensor | float, weight: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """`solve_delta` and its error in one pass, without a host sync: (delta_weight [D_out, D] fp32, eps 0-dim fp64).

    At the ridge optimum (G + lam I) dW = C W, so tr(dW^T G dW) = tr(dW^T C W) - lam ||dW||^2 and
    eps = s - tr(dW^T C W) - lam ||dW||^2: no D^3 product beyond the solve's (`reconstruction_error` needs two
    more). eps is NaN when G + lam I is not positive definite; the caller then leaves that layer alone.
    """
    _check_solve_inputs(G, C, weight, lam)
    delta_w, target, info = _ridge_solve(G, C, weight, lam)
    if isinstance(s, Tensor):
        s64 = s.to(device=delta_w.device, dtype=torch.float64)
    else:
        s64 = torch.full((), float(s), dtype=torch.float64, device=delta_w.device)
    eps = s64 - (delta_w * target).sum() - lam * delta_w.square().sum()
    eps = torch.where(info == 0, eps, torch.full_like(eps, math.nan))
    return delta_w.T.to(torch.float32).contiguous(), eps


@torch.no_grad()
def reconstruction_error(
    G: Tensor, C: Tensor, s: Tensor | float, delta_weight: Tensor, weight: Tensor
) -> float:
    """eps = ||A_loc dW - R||^2 = tr(dW^T G dW) - 2 tr(dW^T C W) + s, from the statistics alone (fp64)."""
    if weight.ndim != 2 or delta_weight.shape != weight.shape:
        raise ValueError(
            f"delta_weight and weight must both be [D_out, D], got {tuple(delta_weight.shape)} and {tuple(weight.shape)}"
        )
    dim = weight.shape[1]
    _check_square("G", G, dim)
    _check_square("C", C, dim)
    delta_w = delta_weight.to(torch.float64).T
    w = weight.to(torch.float64).T
    quadratic = ((G.to(torch.float64) @ delta_w) * delta_w).sum()
    cross = ((C.to(torch.float64) @ w) * delta_w).sum()
    s64 = s.to(torch.float64) if isinstance(s, Tensor) else torch.tensor(float(s), dtype=torch.float64)
    return float(quadratic - 2.0 * cross + s64.to(quadratic.device))


def select_local_layers(eps: Sequence[float], k: int) -> list[int]:
    """Indices of the `k` layers with the smallest eps (ties: lower index first), sorted ascending."""
    if not 0 <= k <= len(eps):
        raise ValueError(f"k must be in [0, {len(eps)}], got {k}")
    if any(math.isnan(e) for e in eps):
        raise ValueError("eps contains NaN")
    ranked = sorted(range(len(eps)), key=lambda i: (eps[i], i))
    return sorted(ranked[:k])
