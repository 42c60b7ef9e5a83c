"""Would storing ISPA's statistics in 16 bits lower the warmup peak without moving ΔW? Measured, not assumed.

    python -m bench.statistics_storage [--json]

One tiny-DiT ISPA warmup feeds the same activations to three `AbsorptionStats`: fp64 (the reference), fp32 (what
the engine keeps), and fp32 accumulation with every stored value rounded to fp16 or bf16 after each update (what
16-bit storage with a per-forward fp32 partial would keep). Each layer's ΔW is then solved in fp64 from each, and
compared with the fp64 solution, next to the condition number of G + lam I that amplifies any storage error.
CPU, random weights: the tiny model's conditioning is not the 14B model's, so this bounds nothing at 14B by itself.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import Tensor

from bench.kv_formats import TinyDiTRun
from ispa import AbsorptionStats, AttentionSession, ISPAPolicy, solve_delta

LAMBDA = 1e-3


class RoundedStats(AbsorptionStats):
    """fp32 statistics whose stored values are rounded to `storage` after every update (16-bit storage)."""

    def __init__(self, num_layers: int, dim: int, device, storage: torch.dtype) -> None:
        super().__init__(num_layers, dim, device)
        self.storage = storage

    def update(self, layer: int, a_loc: Tensor, a_full: Tensor, weight: Tensor) -> None:
        super().update(layer, a_loc, a_full, weight)
        for store in (self._G_pairs[layer // 2], self._G_diagonal[layer], self._C[layer]):
            if store is not None:
                store.copy_(store.to(self.storage))


class TeeStats(AbsorptionStats):
    """The engine's fp32 statistics, with every update also fed to the reference and the rounded copies."""

    def __init__(self, num_layers: int, dim: int, device) -> None:
        super().__init__(num_layers, dim, device)
        self.others = {
            "fp64": AbsorptionStats(num_layers, dim, device, torch.float64),
            "fp16 storage": RoundedStats(num_layers, dim, device, torch.float16),
            "bf16 storage": RoundedStats(num_layers, dim, device, torch.bfloat16),
        }
        self.weights: dict[int, Tensor] = {}

    def update(self, layer: int, a_loc: Tensor, a_full: Tensor, weight: Tensor) -> None:
        super().update(layer, a_loc, a_full, weight)
        self.weights[layer] = weight.detach().clone()
        for stats in self.others.values():
            stats.update(layer, a_loc, a_full, weight)


class TeeSession(AttentionSession):
    """An ISPA session whose statistics are a `TeeStats`, kept for inspection after the run."""

    tee: TeeStats | None = None

    def _statistics(self, like: Tensor) -> AbsorptionStats:
        if self._stats is None:
            self._stats = TeeStats(self.num_layers, like.shape[-2] * like.shape[-1], like.device)
            self.tee = self._stats
        return self._stats


def measure(blocks: int = 3) -> dict[str, object]:
    """Per layer: cond(G + lam I) and |ΔW - ΔW_fp64| / |ΔW_fp64| for fp32, fp16 and bf16 storage."""
    holder = {}

    def session(num_layers, layout):
        # t_warm covers the whole run, so the statistics are still there to compare at the end
        holder["s"] = TeeSession(ISPAPolicy(k_fraction=0.5, t_warm=3 * blocks + 3), num_layers, layout)
        return holder["s"]

    TinyDiTRun(blocks=blocks).run(session)
    tee = holder["s"].tee
    sets = {"fp32 (engine)": tee, **{k: v for k, v in tee.others.items() if k != "fp64"}}
    reference = tee.others["fp64"]
    layers = sorted(tee.weights)
    result: dict[str, object] = {"layers": layers, "cond": [], "relative_delta_error": {n: [] for n in sets}}
    for layer in layers:
        weight = tee.weights[layer]
        g = reference.G(layer)
        eig = torch.linalg.eigvalsh(g + LAMBDA * torch.eye(g.shape[0], dtype=g.dtype))
        result["cond"].append((eig.max() / eig.min()).item())
        want = solve_delta(g, reference.C(layer), weight, LAMBDA).double()
        for name, stats in sets.items():
            try:
                got = solve_delta(stats.G(layer), stats.C(layer), weight, LAMBDA).double()
            except RuntimeError:  # rounding made G + lam I indefinite: no ΔW at all
                result["relative_delta_error"][name].append(None)
                continue
            result["relative_delta_error"][name].append(((got - want).norm() / want.norm()).item())
    result["tokens_per_layer"] = reference.count(layers[0])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.statistics_storage", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = measure()
    print(f"device: CPU, tiny DiT (D=64), {result['tokens_per_layer']} tokens of statistics per layer")
    print("layer  cond(G+lam I)  " + "  ".join(f"{n:>14}" for n in result["relative_delta_error"]))
    for i, layer in enumerate(result["layers"]):
        errors = "  ".join(
            f"{'not PD':>14}" if e[i] is None else f"{e[i]:>14.3e}"
            for e in result["relative_delta_error"].values()
        )
        print(f"{layer:>5}  {result['cond'][i]:>13.3e}  {errors}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
