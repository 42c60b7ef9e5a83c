"""Both LiveAvatar backends speak `AvatarBackend`, the app's one view of a model: the one-process pipeline and
rank 0's lead of a pipeline of ranks (unjoined here: nothing is sent)."""

from __future__ import annotations

import numpy as np
import pytest

from avatars.base import AvatarBackend
from avatars.liveavatar.loading import build_tiny_pipeline
from avatars.memory import MemoryPlan
from ispa import FullPolicy, ISPAPolicy
from tests.app.conftest import unjoined_lead


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


def test_the_one_process_pipeline_is_a_backend_with_one_gpu_plan(pipe) -> None:
    assert isinstance(pipe, AvatarBackend)
    assert (pipe.sample_rate, pipe.fps, pipe.is_test_model) == (16000, 25, True)
    height, width = pipe.planned_size(pipe.size_choices()[0][1])
    assert (height, width) == pipe.output_size(np.zeros((160, 90, 3), np.uint8))  # a 16:9 portrait
    plans = pipe.memory_plans(height, width, ISPAPolicy(t_warm=6), "fp8")
    assert len(plans) == 1 and isinstance(plans[0], MemoryPlan)
    assert plans[0].settings["kv_format"] == "fp8" and plans[0].settings["t_warm"] == 6
    full = pipe.memory_plans(height, width, FullPolicy(), "fp8")[0]
    assert full.peak_after_bytes != plans[0].peak_after_bytes  # the policy reaches the plan


@pytest.mark.parametrize(("processes", "roles"), [(2, 2), (3, 3), (4, 3), (5, 3)])
def test_the_lead_of_ranks_is_a_backend_with_a_plan_per_role(processes: int, roles: int) -> None:
    lead = unjoined_lead(processes)
    assert isinstance(lead, AvatarBackend)
    assert (lead.sample_rate, lead.fps, lead.size_choices()) == (16000, 25, lead.pipeline.size_choices())
    height, width = lead.planned_size(lead.size_choices()[0][1])
    plans = lead.memory_plans(height, width, FullPolicy(), "bf16")
    assert len(plans) == roles
    one_gpu = lead.pipeline.memory_plans(height, width, FullPolicy(), "bf16")[0]
    assert max(plan.peak_bytes for plan in plans) < one_gpu.peak_bytes  # each rank holds a share
