"""The policies bench's computed 14B figures: every comparison policy holds ISPA's KV bytes after the warmup,
about half of Full's at k_fraction 0.5, and the budget it reports is the one the engine applies."""

from __future__ import annotations

from bench.policies import budget_text, planned_kv_at_14b
from ispa import make_policy


def test_the_planned_14b_kv_of_every_comparison_policy_is_ispas() -> None:
    planned = planned_kv_at_14b(6)
    ispa, full = planned["ispa"]["after"], planned["full"]["after"]
    assert 0.5 * full < ispa < 0.55 * full  # half the layers' rings, every layer's sink
    for name in ("evict", "window", "salience"):
        assert abs(planned[name]["after"] - ispa) <= 0.01 * ispa, name
        assert planned[name]["warmup"] >= planned["full"]["warmup"]  # the warmup holds Full's whole rings
    assert planned["salience"]["warmup"] > planned["window"]["warmup"]  # plus its scores


def test_budgets_are_described_as_the_engine_applies_them() -> None:
    assert (
        budget_text("window", make_policy("window", k_fraction=0.25), 40)
        == "0.750 of every layer's ring (by bytes)"
    )
    assert budget_text("evict", make_policy("evict", k_fraction=0.25), 40) == "rings of 30 of 40 layers, ΔW=0"
    assert budget_text("ispa", make_policy("ispa", k_fraction=0.25), 40) == "rings of 30 of 40 layers"
