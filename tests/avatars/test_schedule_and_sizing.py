import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from avatars.liveavatar.schedule import (
    SCHEDULE_SHIFT,
    DenoisingSchedule,
    euler_step,
    flow_match_sigmas,
    timesteps_from_sigmas,
)
from avatars.liveavatar.sizing import choose_size, fit_portrait


@pytest.mark.parametrize("steps,shift", [(4, 3.0), (8, 5.0), (1, 3.0)])
def test_schedule_matches_diffusers(steps, shift):
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    reference.set_timesteps(steps)
    sigmas = flow_match_sigmas(steps, shift)
    torch.testing.assert_close(sigmas.float(), reference.sigmas.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        timesteps_from_sigmas(sigmas).float(), reference.timesteps.float(), rtol=1e-6, atol=1e-4
    )


def test_euler_step_matches_diffusers_step():
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    reference.set_timesteps(4)
    sigmas = flow_match_sigmas()
    x = torch.randn(1, 16, 3, 4, 4)
    for i, t in enumerate(reference.timesteps):
        flow = torch.randn_like(x)
        expected = reference.step(flow, t, x, return_dict=False)[0]
        x = euler_step(x, flow, float(sigmas[i]), float(sigmas[i + 1]))
        torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)


def test_invalid_schedule_settings():
    with pytest.raises(ValueError, match="steps"):
        flow_match_sigmas(0)
    with pytest.raises(ValueError, match="shift"):
        flow_match_sigmas(4, shift=0)


@pytest.mark.parametrize("hw", [(720, 400), (400, 720), (1344, 768), (768, 1344)])
def test_official_examples_give_704_by_384(hw):
    h, w = choose_size(*hw, max_area=720 * 400, divisor=64)
    assert {h, w} == {704, 384}
    assert (h > w) == (hw[0] > hw[1])


@pytest.mark.parametrize("hw", [(1, 5000), (5000, 1), (333, 777), (64, 64), (10000, 10000)])
def test_choose_size_respects_area_and_divisor(hw):
    h, w = choose_size(*hw, max_area=64 * 64, divisor=16)
    assert h % 16 == 0 and w % 16 == 0
    assert h >= 16 and w >= 16 and h * w <= 64 * 64


def test_fit_portrait_crops_centre():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 50:150] = 255  # a white centre band that must survive the crop
    out = fit_portrait(image, 64, 64)
    assert out.shape == (64, 64, 3)
    assert out.mean() > 250
    with pytest.raises(ValueError, match="RGB"):
        fit_portrait(np.zeros((10, 10), np.uint8), 8, 8)


# ---- fewer denoising steps (a deviation, off by default)
OFFICIAL_TIMESTEPS = (1000.0, 857.69, 602.15, 8.93)  # docs/shared reference, computed with diffusers 0.31


def test_four_steps_are_todays_official_schedule_exactly():
    schedule = DenoisingSchedule.liveavatar(4)
    sigmas = flow_match_sigmas(4, SCHEDULE_SHIFT)
    assert schedule == DenoisingSchedule.liveavatar()
    assert schedule.sigmas == tuple(sigmas.tolist())  # bit for bit the 4-step shift-3 grid
    assert schedule.timesteps == tuple(timesteps_from_sigmas(sigmas).tolist())
    np.testing.assert_allclose(schedule.timesteps, OFFICIAL_TIMESTEPS, atol=5e-3)
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULE_SHIFT)
    reference.set_timesteps(4)
    np.testing.assert_allclose(schedule.sigmas, reference.sigmas.double().numpy(), rtol=1e-6)


@pytest.mark.parametrize("steps,kept", [(3, (1000.0, 857.69, 602.15)), (2, (1000.0, 602.15))])
def test_shorter_schedules_keep_official_timesteps_and_end_at_zero(steps, kept):
    official = DenoisingSchedule.liveavatar(4)
    schedule = DenoisingSchedule.liveavatar(steps)
    assert schedule.steps == steps and len(schedule.sigmas) == steps + 1
    np.testing.assert_allclose(schedule.timesteps, kept, atol=5e-3)  # the values docs/performance.md names
    assert set(schedule.timesteps) <= set(official.timesteps)  # only timesteps the model was distilled at
    assert schedule.sigmas[:-1] == tuple(
        official.sigmas[official.timesteps.index(t)] for t in schedule.timesteps
    )
    assert schedule.sigmas[-1] == 0.0  # the last Euler step lands on clean latents


def test_a_diffusers_grid_at_any_shift_ends_near_zero():
    """Why the shorter schedules are not re-shifted grids: the last forward of such a grid is a near no-op."""
    for shift in (1.0, 1.5, 3.0, 6.0, 10.0):
        last = float(flow_match_sigmas(2, shift)[-2])
        assert last < shift**2 / 1000 * 1.01


@pytest.mark.parametrize("steps", [5, 1, 0, "3", 3.5, True])
def test_other_step_counts_are_refused_naming_the_field(steps):
    with pytest.raises(ValueError, match=r"^steps \(denoising steps\) must be one of 4, 3, 2"):
        DenoisingSchedule.liveavatar(steps)
