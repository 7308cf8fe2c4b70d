"""Images into the VAE's latent space: the one place training, caching and evaluation encode."""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_posterior(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) in [-1, 1] -> the VAE posterior's (mean, std), each (B, C, H/f, W/f) in
    float32 and not yet scaled by `vae.config.scaling_factor`; computed on the VAE's own device
    and in its dtype."""
    weight = next(vae.parameters())
    posterior = vae.encode(pixels.to(weight.device, weight.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


def scale_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents as the denoiser sees them: (z - shift) * scale. SD 1.x/2.x/SDXL have no
    shift; SD3's 16-channel VAE has one (0.0609, scale 1.5305)."""
    shift = vae.config.get("shift_factor") or 0.0
    return (latents - shift) * vae.config.scaling_factor


def unscale_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `scale_latents`: what the VAE's decoder reads."""
    shift = vae.config.get("shift_factor") or 0.0
    return latents / vae.config.scaling_factor + shift
