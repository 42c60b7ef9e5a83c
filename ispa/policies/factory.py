"""Policies by name, so every front end (CLI, app, benchmarks) builds them the same way."""

from __future__ import annotations

from typing import Any

from ispa.policies.base import Policy
from ispa.policies.full import FullPolicy
from ispa.policies.ispa import ISPAPolicy

POLICIES: dict[str, type[Policy]] = {FullPolicy.name: FullPolicy, ISPAPolicy.name: ISPAPolicy}


def make_policy(name: str, **ispa_settings: Any) -> Policy:
    """`FullPolicy()` for "full", `ISPAPolicy(**ispa_settings)` for "ispa".

    Full has no settings, so it ignores them: one call with the user's settings serves every policy.
    """
    if name == FullPolicy.name:
        return FullPolicy()
    if name == ISPAPolicy.name:
        return ISPAPolicy(**ispa_settings)
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
