"""Policies by name, so every front end (CLI, app, benchmarks) builds them the same way."""

from __future__ import annotations

from typing import Any

from ispa.policies.base import Policy
from ispa.policies.budgeted import BudgetedPolicy
from ispa.policies.evict import EvictPolicy
from ispa.policies.full import FullPolicy
from ispa.policies.ispa import ISPAPolicy
from ispa.policies.salience import SaliencePolicy
from ispa.policies.window import WindowPolicy

POLICIES: dict[str, type[Policy]] = {
    policy.name: policy for policy in (FullPolicy, ISPAPolicy, EvictPolicy, WindowPolicy, SaliencePolicy)
}
BUDGETED_SETTINGS = ("k_fraction", "t_warm")  # what Window and Salience take of the user's ISPA settings


def make_policy(name: str, **ispa_settings: Any) -> Policy:
    """The policy called `name`, built from the user's ISPA settings.

    Full takes none of them, Window and Salience only `k_fraction` and `t_warm` (the ISPA run whose memory and
    warmup they match), Evict all of them: one call with the user's settings serves every policy.
    """
    policy = POLICIES.get(name)
    if policy is None:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
    if policy is FullPolicy:
        return FullPolicy()
    if issubclass(policy, BudgetedPolicy):
        return policy(**{key: value for key, value in ispa_settings.items() if key in BUDGETED_SETTINGS})
    return policy(**ispa_settings)
