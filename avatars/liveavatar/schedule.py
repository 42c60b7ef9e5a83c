"""The flow-matching sampling schedule LiveAvatar was distilled for: 4 Euler steps, shift 3.

This reproduces diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3).set_timesteps(4)`
(timesteps ≈ [1000, 857.7, 602.2, 8.9]) without keeping a stateful scheduler object per run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avatars.liveavatar.block_layout import DENOISING_STEPS

SCHEDULE_SHIFT = 3.0


def _shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_match_sigmas(steps: int = 4, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Noise levels σ_0 > … > σ_{steps-1} > σ_steps = 0 in float64.

    The sampler's range ends at the shifted smallest training sigma (1/num_train_timesteps), and the
    evenly spaced levels are shifted once more — exactly as diffusers does it.
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigma_min = _shift(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift)
    sigmas = _shift(torch.linspace(1.0, float(sigma_min), steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def timesteps_from_sigmas(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Model timesteps (the DiT's conditioning input) for each denoising step."""
    return sigmas[:-1] * num_train_timesteps


def euler_step(latents: torch.Tensor, flow: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE, computed in fp32 and returned in the latents' dtype."""
    return (latents.float() + (sigma_next - sigma) * flow.float()).to(latents.dtype)


@dataclass(frozen=True)
class DenoisingSchedule:
    """Per step: the DiT's timestep, and the noise levels an Euler step goes from and to (`sigmas[step + 1]`)."""

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]

    @classmethod
    def liveavatar(cls) -> DenoisingSchedule:
        """LiveAvatar's 4 steps at shift 3 (every process of a pipeline builds the same)."""
        sigmas = flow_match_sigmas(DENOISING_STEPS, SCHEDULE_SHIFT)
        return cls(tuple(timesteps_from_sigmas(sigmas).tolist()), tuple(sigmas.tolist()))
