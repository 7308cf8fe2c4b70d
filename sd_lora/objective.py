"""The denoising objective, as small pure functions: timesteps, noise, targets, loss.

`loss = denoising_loss(unet, schedule, latents, text_embeddings, noise, timesteps)`; nothing here
knows about optimizers, files or Accelerate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def training_schedule(scheduler_config: dict, prediction_type: str) -> DDPMScheduler:
    """The forward (noising) process of the base model, with the prediction type to train."""
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    config["prediction_type"] = prediction_type
    return DDPMScheduler.from_config(config)


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, generator: torch.Generator
) -> torch.Tensor:
    """Uniform integer timesteps in [0, T), one per sample. (B,)"""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)


def sample_noise(latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like the latents, drawn on the CPU for reproducibility."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    return noise.to(device=latents.device, dtype=latents.dtype)


def add_noise_offset(
    noise: torch.Tensor, strength: float, generator: torch.Generator
) -> torch.Tensor:
    """`noise` plus a per-image, per-channel constant of scale `strength` (sd-scripts'
    noise_offset): lets training change an image's overall colour, which SD's schedule never
    fully noises away."""
    if not strength:
        return noise
    shift = torch.randn(noise.shape[:2] + (1, 1), generator=generator, dtype=torch.float32)
    return noise + strength * shift.to(device=noise.device, dtype=noise.dtype)


def target(
    schedule: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = schedule.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return schedule.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction type {kind!r} is not supported; use epsilon or v_prediction")


def denoising_loss(
    unet: torch.nn.Module,
    schedule: DDPMScheduler,
    latents: torch.Tensor,  # (B, 4, h, w), already scaled by the VAE scaling factor
    text_embeddings: torch.Tensor,  # (B, 77, D)
    noise: torch.Tensor,  # (B, 4, h, w)
    timesteps: torch.Tensor,  # (B,)
) -> torch.Tensor:
    """Mean squared error between the UNet's prediction and the target, in fp32."""
    noisy = schedule.add_noise(latents, noise, timesteps.to(latents.device))
    prediction = unet(noisy, timesteps.to(latents.device), text_embeddings).sample
    wanted = target(schedule, latents.float(), noise.float(), timesteps.to(latents.device))
    return F.mse_loss(prediction.float(), wanted.float())
