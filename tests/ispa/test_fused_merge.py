"""The fused LSE merge (`ispa.fused_merge`, compiled) against the eager merge it replaces, and in a session."""

from __future__ import annotations

import math

import pytest
import torch

from ispa import AttentionSession, CacheLayout, FullPolicy, fused_merge, merge_attention
from ispa.fused_merge import merge_and_measure

B, L, H, D = 1, 24, 2, 8


def parts(dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out_loc, out_hist = (torch.randn(B, L, H, D, generator=gen).to(dtype) for _ in range(2))
    lse_loc = 3 * torch.randn(B, H, L, generator=gen)
    lse_hist = 3 * torch.randn(B, H, L, generator=gen)
    lse_hist[0, 0, :3] = -math.inf  # queries whose history part is empty: weight 0, never NaN
    return out_loc, lse_loc, out_hist, lse_hist


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_merge_equals_the_eager_one_within_rounding(dtype):
    inputs = parts(dtype, seed=1)
    out, peak, share = merge_and_measure(*inputs, fused=True)
    assert not fused_merge._broken, fused_merge._broken  # it really compiled (no silent eager fallback)
    eager_out, _ = merge_attention(*inputs)
    eager_share = torch.sigmoid(inputs[3] - inputs[1]).mean()
    assert out.dtype == dtype and torch.isfinite(out).all()
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}
    torch.testing.assert_close(out, eager_out, **tolerance)  # bf16: at most one rounding step apart
    assert torch.equal(peak, inputs[3].amax())
    torch.testing.assert_close(share, eager_share, rtol=1e-6, atol=1e-7)
    eager = merge_and_measure(*inputs, fused=False)
    assert torch.equal(eager[0], eager_out) and torch.equal(eager[2], eager_share)


def test_a_compile_failure_falls_back_to_the_eager_merge_once(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no compiler here\nmore lines")

    monkeypatch.setattr(fused_merge, "_compiled", lambda: broken)
    monkeypatch.setattr(fused_merge, "_broken", [])
    inputs = parts(torch.float32, seed=2)
    out, _, _ = merge_and_measure(*inputs)
    assert torch.equal(out, merge_attention(*inputs)[0])
    assert fused_merge._broken == ["RuntimeError: no compiler here"]
    assert "merging eagerly from now on" in caplog.text
    merge_and_measure(*inputs)  # not tried again
    assert len(fused_merge._broken) == 1


def test_a_session_with_the_fused_merge_gives_the_eager_sessions_outputs_and_shares():
    layout = CacheLayout(block_tokens=L, history_blocks=2, num_rings=1, frames_per_block=1)
    proj = torch.nn.Linear(H * D, H * D)
    gen = torch.Generator().manual_seed(3)
    blocks = [[torch.randn(B, L, H, D, generator=gen) for _ in range(5)] for _ in range(3)]
    results = {}
    for fused in (False, True):
        session = AttentionSession(FullPolicy(), 1, layout, fused_merge=fused)
        outs, masses = [], []
        for q, k, v, new_k, new_v in blocks:
            outs.append(session.self_attention(0, q, k, v, new_k, new_v, proj, ring=0))
            masses.append(session.end_block().history_mass)
        results[fused] = outs, masses
    for eager, fused in zip(*results.values(), strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fused_merge"):
        AttentionSession(FullPolicy(), 1, layout, fused_merge="yes")
