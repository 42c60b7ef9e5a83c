"""Property-based checks of the LSE merge: order of parts does not matter, and any partition of the keys merges
back to attention over all of them."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ispa import attention_with_lse, merge_attention

TOLERANCE = 1e-5


@st.composite
def partitioned_attention(draw):
    """Random q/k/v plus a split of the keys into 3 parts (each possibly empty)."""
    batch = draw(st.integers(1, 2))
    queries = draw(st.integers(1, 6))
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([1, 4, 8, 16]))
    sizes = draw(st.lists(st.integers(0, 7), min_size=3, max_size=3))
    key_scale = draw(st.sampled_from([0.1, 1.0, 4.0]))  # 4.0 gives peaked softmaxes with large LSE gaps
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, head_dim, generator=gen)
    keys = sum(sizes)
    k = torch.randn(batch, keys, heads, head_dim, generator=gen) * key_scale
    v = torch.randn(batch, keys, heads, head_dim, generator=gen)
    bounds = [0, sizes[0], sizes[0] + sizes[1], keys]
    parts = [attention_with_lse(q, k[:, a:b], v[:, a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return q, k, v, parts


def _close(x, y) -> bool:
    both_inf = torch.isneginf(x) & torch.isneginf(y)
    return bool(torch.where(both_inf, 0.0, (x - y).abs()).max() <= TOLERANCE)


@settings(max_examples=60, deadline=None, database=None)
@given(partitioned_attention())
def test_merge_is_commutative(case):
    _, _, _, (a, b, _) = case
    out_ab, lse_ab = merge_attention(*a, *b)
    out_ba, lse_ba = merge_attention(*b, *a)
    assert _close(out_ab, out_ba) and _close(lse_ab, lse_ba)


@settings(max_examples=60, deadline=None, database=None)
@given(partitioned_attention())
def test_merge_is_associative(case):
    _, _, _, (a, b, c) = case
    left = merge_attention(*merge_attention(*a, *b), *c)
    right = merge_attention(*a, *merge_attention(*b, *c))
    assert _close(left[0], right[0]) and _close(left[1], right[1])


@settings(max_examples=60, deadline=None, database=None)
@given(partitioned_attention(), st.permutations([0, 1, 2]))
def test_any_order_of_parts_merges_to_attention_over_all_keys(case, order):
    q, k, v, parts = case
    first, second, third = (parts[i] for i in order)
    out, lse = merge_attention(*merge_attention(*first, *second), *third)
    if k.shape[1] == 0:
        assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
        return
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    ref_out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v.double())
    assert (out.double() - ref_out).abs().max() <= TOLERANCE
    assert (lse.double() - torch.logsumexp(scores, dim=-1)).abs().max() <= TOLERANCE
