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
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["AbsorptionStats", "solve_delta", "reconstruction_error", "select_local_layers"]


class AbsorptionStats:
    """Streaming G, C, s per layer, allocated on a layer's first update.

    Memory: 2 x D^2 x 4 bytes per layer in fp32 (210 MB at D = 5120), held only while ISPA warms up.
    """

    def __init__(
        self, num_layers: int, dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ):
        if num_layers < 1 or dim < 1:
            raise ValueError(f"num_layers and dim must be positive, got {num_layers} and {dim}")
        if not dtype.is_floating_point:
            raise ValueError(f"statistics need a floating dtype, got {dtype}")
        self.num_layers = num_layers
        self.dim = dim
        self.device = torch.device(device)
        self.dtype = dtype
        self._G: list[Tensor | None] = [None] * num_layers
        self._C: list[Tensor | None] = [None] * num_layers
        self._s: list[Tensor | None] = [None] * num_layers
        self._count = [0] * num_layers

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")

    @torch.no_grad()
    def update(self, layer: int, a_loc: Tensor, a_full: Tensor, weight: Tensor) -> None:
        """Add one forward's activations. a_loc/a_full: [..., D] (leading dims are tokens); weight: [D_out, D]."""
        self._check_layer(layer)
        if a_loc.shape != a_full.shape or a_loc.shape[-1] != self.dim:
            raise ValueError(
                f"a_loc and a_full must both be [..., {self.dim}], got {tuple(a_loc.shape)} and {tuple(a_full.shape)}"
            )
        if weight.ndim != 2 or weight.shape[1] != self.dim:
            raise ValueError(f"weight must be [D_out, {self.dim}], got {tuple(weight.shape)}")
        if self._G[layer] is None:
            self._G[layer] = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
            self._C[layer] = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
            self._s[layer] = torch.zeros((), dtype=self.dtype, device=self.device)
        local = a_loc.detach().reshape(-1, self.dim).to(device=self.device, dtype=self.dtype)
        gap = a_full.detach().reshape(-1, self.dim).to(device=self.device, dtype=self.dtype) - local
        self._G[layer].addmm_(local.T, local)
        self._C[layer].addmm_(local.T, gap)
        residual = gap @ weight.detach().to(device=self.device, dtype=self.dtype).T  # R = (A_full - A_loc) W
        self._s[layer].add_(residual.square().sum())
        self._count[layer] += local.shape[0]

    def _get(self, store: list[Tensor | None], layer: int) -> Tensor:
        self._check_layer(layer)
        value = store[layer]
        if value is None:
            raise RuntimeError(f"layer {layer} has no statistics yet")
        return value

    def G(self, layer: int) -> Tensor:
        """Sum of A_loc^T A_loc, [D, D]."""
        return self._get(self._G, layer)

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

    def nbytes(self) -> int:
        stores = (*self._G, *self._C, *self._s)
        return sum(t.nbytes for t in stores if t is not None)

    def free(self, layer: int | None = None) -> None:
        """Drop the statistics of one layer, or of all layers."""
        layers = range(self.num_layers) if layer is None else [layer]
        for index in layers:
            self._check_layer(index)
            self._G[index] = self._C[index] = self._s[index] = None
            self._count[index] = 0


def _check_square(name: str, matrix: Tensor, dim: int) -> None:
    if matrix.shape != (dim, dim):
        raise ValueError(f"{name} must be [{dim}, {dim}], got {tuple(matrix.shape)}")


@torch.no_grad()
def solve_delta(G: Tensor, C: Tensor, weight: Tensor, lam: float) -> Tensor:
    """The ridge update of a Linear's weight, delta_weight = ((G + lam I)^-1 C weight^T)^T, [D_out, D] fp32.

    Solved by Cholesky in fp64: lam (1e-3) is tiny against G's scale (a sum over tens of thousands of tokens), so G +
    lam I can be ill-conditioned in fp32, while fp64 costs one D x D factorisation per layer once per warmup.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be [D_out, D], got {tuple(weight.shape)}")
    dim = weight.shape[1]
    _check_square("G", G, dim)
    _check_square("C", C, dim)
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a positive finite number, got {lam}")
    regularised = G.to(torch.float64, copy=True)
    regularised.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(regularised)
    if int(info) != 0:
        raise RuntimeError(f"G + lam I is not positive definite (Cholesky failed at minor {int(info)})")
    target = C.to(torch.float64) @ weight.to(torch.float64).T  # C W = A_loc^T R, [D, D_out]
    delta_w = torch.cholesky_solve(target, factor)  # paper's dW, [D, D_out]
    return delta_w.T.to(torch.float32).contiguous()


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
