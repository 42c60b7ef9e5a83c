"""16-bit storage of ISPA's statistics, measured on the tiny DiT: fp32 keeps ΔW at the fp64 solution, fp16 does not."""

from __future__ import annotations

import torch

from bench.statistics_storage import RoundedStats, measure


def test_rounded_storage_holds_exactly_16_bit_values():
    stats = RoundedStats(2, 8, "cpu", torch.float16)
    gen = torch.Generator().manual_seed(0)
    a_loc, a_full, weight = (torch.randn(5, 8, generator=gen) for _ in range(3))
    stats.update(0, a_loc, a_full, weight[:8])
    c = stats.C(0)
    assert torch.equal(c, c.half().float()) and not torch.equal(c, (a_loc.T @ (a_full - a_loc)))


def test_fp32_statistics_stay_at_the_fp64_solution_and_fp16_storage_moves_it_far():
    result = measure(blocks=2)
    fp32 = result["relative_delta_error"]["fp32 (engine)"]
    fp16 = result["relative_delta_error"]["fp16 storage"]
    assert max(fp32) < 1e-3
    assert all(e is None or e > 100 * max(fp32) for e in fp16)
