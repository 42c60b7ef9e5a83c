"""The flow-matching sampling schedule LiveAvatar was distilled for: 4 Euler steps, shift 3.

This reproduces diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3).set_timesteps(4)`
(timesteps ≈ [1000, 857.7, 602.2, 8.9]) without keeping a stateful scheduler object per run.

Fewer steps (a deviation from the official pipeline, off by default) keep only timesteps the model was distilled
at and end the last Euler step at σ = 0: 3 steps drop 8.9 (its Euler update is 0.0089 × the flow, under 1 % of it),
2 steps drop 857.7 too (the shortest of the remaining σ intervals, 1 → 0.858). No re-tuned shift of diffusers' grid
does this: that grid always ends near σ = shift² / 1000, so its last forward is a near no-op at any shift and
2 steps would leave one real step (docs/performance.md, "Fewer denoising steps").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avatars.liveavatar.block_layout import DENOISING_STEPS

SCHEDULE_SHIFT = 3.0
STEP_CHOICES = (4, 3, 2)  # 4: the official schedule; 3 and 2: deviations, for speed
# Which of the official 4 steps each shorter schedule keeps (the DiT's timestep and the σ it starts from).
KEPT_STEPS = {4: (0, 1, 2, 3), 3: (0, 1, 2), 2: (0, 2)}


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

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def liveavatar(cls, steps: int = DENOISING_STEPS) -> DenoisingSchedule:
        """LiveAvatar's 4 steps at shift 3, or the 3 or 2 of them `KEPT_STEPS` names, the last Euler step ending
        at σ = 0 (every process of a pipeline builds the same)."""
        check_steps(steps)
        sigmas = flow_match_sigmas(DENOISING_STEPS, SCHEDULE_SHIFT)
        timesteps = timesteps_from_sigmas(sigmas).tolist()
        kept = KEPT_STEPS[steps]
        return cls(tuple(timesteps[i] for i in kept), (*(float(sigmas[i]) for i in kept), 0.0))


def check_steps(steps: object) -> int:
    """`steps` if it is one of `STEP_CHOICES`, else ValueError naming the field."""
    if isinstance(steps, bool) or steps not in STEP_CHOICES:
        choices = ", ".join(str(n) for n in STEP_CHOICES)
        raise ValueError(f"steps (denoising steps) must be one of {choices}, got {steps!r}")
    return int(steps)
