import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from avatars.liveavatar.schedule import euler_step, flow_match_sigmas, timesteps_from_sigmas
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
