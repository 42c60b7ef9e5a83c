"""KV policies: Full (the baseline), ISPA, and the comparisons at ISPA's memory (Evict, Window, Salience)."""

from ispa.policies.base import Action, Phase, Policy, PolicyState
from ispa.policies.budgeted import BudgetedPolicy
from ispa.policies.evict import EvictPolicy
from ispa.policies.factory import POLICIES, make_policy
from ispa.policies.full import FullPolicy
from ispa.policies.ispa import ISPAPolicy, history_mass_drift
from ispa.policies.salience import SaliencePolicy
from ispa.policies.window import WindowPolicy

__all__ = [
    "POLICIES",
    "Action",
    "BudgetedPolicy",
    "EvictPolicy",
    "FullPolicy",
    "ISPAPolicy",
    "Phase",
    "Policy",
    "PolicyState",
    "SaliencePolicy",
    "WindowPolicy",
    "history_mass_drift",
    "make_policy",
]
