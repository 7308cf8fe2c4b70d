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
