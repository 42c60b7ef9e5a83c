"""The GPU memory plan of a LiveAvatar run, in one place: its terms' arithmetic (`terms`), the roles a GPU can have
(`roles`: one GPU, or a rank of the timestep pipeline), the plan of each role (`plan`), and the command that prints
them (`python -m avatars.liveavatar.memory_plan`, `cli`).

The generic types (`MemoryPlan`, `Term`, `TermKind`, capacities) live in `avatars.memory`: the app reads plans
through them without knowing LiveAvatar.
"""

from avatars.liveavatar.memory_plan.plan import (
    InsufficientGPUMemoryError,
    check_fits_free_memory,
    lightest_plan,
    plan_roles,
    plan_terms,
)
from avatars.liveavatar.memory_plan.roles import Role, role_of_rank, roles_of

__all__ = [
    "InsufficientGPUMemoryError",
    "Role",
    "check_fits_free_memory",
    "lightest_plan",
    "plan_roles",
    "plan_terms",
    "role_of_rank",
    "roles_of",
]
