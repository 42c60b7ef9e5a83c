"""KV policies: Full (the baseline) and ISPA."""

from ispa.policies.base import Action, Phase, Policy, PolicyState
from ispa.policies.factory import POLICIES, make_policy
from ispa.policies.full import FullPolicy
from ispa.policies.ispa import ISPAPolicy, history_mass_drift

__all__ = [
    "POLICIES",
    "Action",
    "FullPolicy",
    "ISPAPolicy",
    "Phase",
    "Policy",
    "PolicyState",
    "history_mass_drift",
    "make_policy",
]
