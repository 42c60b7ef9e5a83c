"""The model-agnostic plan types (`avatars.memory`): peaks, fits, a role's share of each term, and compare mode's
peak, on terms made by hand."""

from __future__ import annotations

import enum

from avatars.memory import (
    CUDA_CONTEXT_BYTES,
    GIB,
    GPU_CARDS,
    MIB,
    MemoryPlan,
    Term,
    TermKind,
    compare_peak_bytes,
)


class Gpu(enum.Enum):
    FIRST = "first GPU"
    SECOND = "second GPU"
    THIRD = "third GPU"


def test_a_peak_is_what_is_held_plus_the_largest_transient():
    plan = MemoryPlan(
        {},
        (
            Term(TermKind.DIT_WEIGHTS, "w", 10 * GIB, 10 * GIB, "", per_model=True),
            Term(TermKind.ISPA_STATISTICS, "s", 3 * GIB, 0, ""),
            Term(TermKind.ACTIVATIONS, "a", 2 * GIB, 2 * GIB, "", transient=True),
            Term(TermKind.ABSORB_WORKSPACE, "ws", 5 * GIB, 0, "", transient=True),
        ),
    )
    assert (plan.peak_warmup_bytes, plan.peak_after_bytes, plan.peak_bytes) == (18 * GIB, 12 * GIB, 18 * GIB)
    assert plan.fits() == [card.name for card in GPU_CARDS]
    # an L40S reports 46,068 MiB (45.0 GiB), not the 48 GiB its "48 GB" would suggest
    l40s = next(card for card in GPU_CARDS if card.name.startswith("L40S"))
    assert l40s.capacity_bytes == 46_068 * MIB and f"{l40s.capacity_bytes / GIB:.1f}" == "45.0"
    just = MemoryPlan({}, (Term(TermKind.KV_CACHE, "kv", l40s.capacity_bytes - CUDA_CONTEXT_BYTES, 0, ""),))
    over = MemoryPlan(
        {}, (Term(TermKind.KV_CACHE, "kv", l40s.capacity_bytes - CUDA_CONTEXT_BYTES + 1, 0, ""),)
    )
    assert "L40S 48 GB" in just.fits() and "L40S 48 GB" not in over.fits()
    assert over.fits() == [c.name for c in GPU_CARDS if c.capacity_bytes > l40s.capacity_bytes]


def test_a_role_holds_the_whole_term_its_share_or_nothing():
    share = Term(TermKind.VAE_WEIGHTS, "the VAE alone", 1, 1, "share")
    whole = Term(
        TermKind.ENCODERS,
        "encoders",
        5,
        5,
        "whole",
        roles=frozenset({Gpu.FIRST, Gpu.THIRD}),
        shares={Gpu.THIRD: share},
    )
    plan = MemoryPlan({"k": 1}, (whole,))
    first, second, third = (plan.for_role(gpu).terms[0] for gpu in Gpu)
    assert (first.warmup, first.name, first.shares) == (5, "encoders", {})
    assert (second.warmup, second.after, second.kind) == (0, 0, TermKind.ENCODERS)
    assert second.basis == "held on: first GPU; third GPU (a part)"
    assert (third.warmup, third.kind, third.name, third.roles) == (
        1,
        TermKind.VAE_WEIGHTS,
        "the VAE alone",
        whole.roles,
    )
    assert plan.for_role(Gpu.SECOND).settings == {"k": 1}
    # a term without roles belongs to a backend of one role: every role holds it whole
    alone = Term(TermKind.KV_CACHE, "kv", 7, 3, "")
    assert alone.held_by(Gpu.SECOND) is alone


def test_compare_mode_counts_the_model_once_and_the_larger_transient():
    def run(kv: int, activations: int) -> MemoryPlan:
        return MemoryPlan(
            {},
            (
                Term(TermKind.DIT_WEIGHTS, "w", 100, 100, "", per_model=True),
                Term(TermKind.KV_CACHE, "kv", kv, kv, ""),
                Term(TermKind.ACTIVATIONS, "a", activations, activations, "", transient=True),
            ),
        )

    first, second = run(10, 7), run(20, 3)
    assert (first.peak_bytes, second.peak_bytes) == (117, 123)
    assert compare_peak_bytes(first, second) == 100 + 10 + 20 + 7
    # A vs B without Full: a third run (Full's) adds its held terms, the model is still counted once
    assert compare_peak_bytes(first, second, run(30, 9)) == 100 + 10 + 20 + 30 + 9
