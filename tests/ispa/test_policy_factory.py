"""Policies by name: one factory for the CLI, the app and the benchmarks."""

from __future__ import annotations

import pytest

from ispa import POLICIES, FullPolicy, ISPAPolicy, make_policy


def test_names_build_their_policy_with_the_given_settings() -> None:
    assert set(POLICIES) == {"full", "ispa", "evict", "window", "salience"}
    ispa = make_policy("ispa", k_fraction=0.25, t_warm=9, lam=0.01, auto_recalibrate=True)
    assert ispa == ISPAPolicy(k_fraction=0.25, t_warm=9, lam=0.01, auto_recalibrate=True)
    assert make_policy("ispa") == ISPAPolicy()  # the policy's own defaults
    assert make_policy("full", k_fraction=0.25, t_warm=9) == FullPolicy()  # Full has no settings


def test_unknown_names_and_bad_settings_are_refused() -> None:
    with pytest.raises(
        ValueError, match="policy must be one of full, ispa, evict, window, salience, got 'turbo'"
    ):
        make_policy("turbo")
    with pytest.raises(ValueError, match="k_fraction"):
        make_policy("ispa", k_fraction=2.0)
