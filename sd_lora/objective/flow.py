"""Rectified flow, SD3's objective: a straight line from the image to the noise.

    noisy = (1 - sigma) * x0 + sigma * noise        sigma in (0, 1), timestep = 1000 * sigma
    target = noise - x0                              (the velocity along that line)

Training draws sigma from a density over (0, 1), then moves it by the scheduler's shift
(SD3: 3), which spends more steps at high noise, where large images still need work:

    sigma = shift * u / (1 + (shift - 1) * u)

The densities of SD3's paper (Esser et al. 2024), as diffusers' and sd-scripts' SD3 trainers
name them: "logit_normal" (u = sigmoid(n), n ~ N(mean, std): the middle weighs most),
"mode" (heavier at one end as mode_scale grows) and "uniform".

`FlowSchedule` stands where a DDPM scheduler stands for the UNet families: `add_noise` and a
`config` with the prediction type ("flow") and the number of timesteps, so the loss, the fixed
evaluation and output preservation use it unchanged. What needs a DDPM schedule (Min-SNR,
debiased estimation, zero terminal SNR, v-prediction) is refused for it, by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOW = "flow"
TIMESTEP_SAMPLINGS = ("logit_normal", "mode", "uniform")


@dataclass(frozen=True)
class FlowConfig:
    """What callers read of a schedule's config (a DDPM scheduler's FrozenDict has the same)."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    prediction_type: str = FLOW

    def get(self, name: str, default=None):
        return getattr(self, name, default)


@dataclass(frozen=True)
class FlowSchedule:
    config: FlowConfig

    @classmethod
    def from_scheduler_config(cls, scheduler_config: dict, shift: float = 0.0) -> FlowSchedule:
        """From a FlowMatchEulerDiscreteScheduler's config; `shift` > 0 replaces its shift."""
        return cls(FlowConfig(int(scheduler_config.get("num_train_timesteps", 1000)),
                              float(shift or scheduler_config.get("shift", 1.0))))

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.config.num_train_timesteps

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas(timesteps).to(latents.device).view(-1, *[1] * (latents.dim() - 1))
        return ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)

    def velocity(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def shifted(self, u: torch.Tensor) -> torch.Tensor:
        shift = self.config.shift
        return shift * u / (1 + (shift - 1) * u)


def sample_flow_timesteps(schedule: FlowSchedule, shape: tuple[int, ...],
                          generator: torch.Generator, sampling: str = "logit_normal",
                          logit_mean: float = 0.0, logit_std: float = 1.0,
                          mode_scale: float = 1.29) -> torch.Tensor:
    """Float timesteps of `shape` in (0, 1000): sigma drawn by `sampling`, shifted, x 1000."""
    u = flow_density_draw(shape, generator, sampling, logit_mean, logit_std, mode_scale)
    return schedule.shifted(u) * schedule.config.num_train_timesteps


def flow_density_draw(shape: tuple[int, ...], generator: torch.Generator, sampling: str,
                      logit_mean: float, logit_std: float, mode_scale: float) -> torch.Tensor:
    """u in (0, 1) from one of TIMESTEP_SAMPLINGS (before the shift)."""
    if sampling == "logit_normal":
        n = torch.randn(shape, generator=generator) * logit_std + logit_mean
        return torch.sigmoid(n)
    u = torch.rand(shape, generator=generator)
    if sampling == "uniform":
        return u
    if sampling == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"unknown timestep sampling {sampling!r}; use one of {TIMESTEP_SAMPLINGS}")
