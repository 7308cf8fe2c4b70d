"""A fixed evaluation loss: the same images, captions, timesteps and noise every time it is computed,
so two numbers (before/after training, with/without an adapter) are directly comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sd_lora.objective import denoising_loss
from sd_lora.text import encode_prompts, tokenize

EVAL_TIMESTEPS = (100, 300, 500, 700, 900)  # spread over the schedule; each image gets every one


@dataclass(frozen=True)
class EvalBatch:
    latents: torch.Tensor  # (N, 4, h, w) scaled latents, N = images x timesteps
    input_ids: torch.Tensor  # (N, 77)
    timesteps: torch.Tensor  # (N,)
    noise: torch.Tensor  # (N, 4, h, w)


@torch.no_grad()
def make_eval_batch(
    pixel_values: torch.Tensor,  # (n, 3, H, W) in [-1, 1]
    captions: list[str],
    vae: torch.nn.Module,
    tokenizer,
    seed: int = 1234,
    timesteps: tuple[int, ...] = EVAL_TIMESTEPS,
) -> EvalBatch:
    """Encode the images once (latent mean, no sampling) and fix the noise from `seed`."""
    vae_param = next(vae.parameters())
    latents = vae.encode(pixel_values.to(vae_param.device, vae_param.dtype)).latent_dist.mean
    latents = latents.float() * vae.config.scaling_factor
    k = len(timesteps)
    latents = latents.repeat_interleave(k, dim=0)
    input_ids = tokenize(tokenizer, captions).repeat_interleave(k, dim=0)
    steps = torch.tensor(timesteps, dtype=torch.long).repeat(len(captions))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    return EvalBatch(latents=latents.cpu(), input_ids=input_ids, timesteps=steps, noise=noise)


@torch.no_grad()
def eval_loss(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    schedule,
    batch: EvalBatch,
    chunk: int = 8,
) -> float:
    """Mean denoising loss over the batch, in chunks to bound memory."""
    unet_param = next(unet.parameters())
    device, dtype = unet_param.device, unet_param.dtype
    total, count = 0.0, 0
    size = batch.latents.shape[0]
    for start in range(0, size, chunk):
        end = min(start + chunk, size)
        embeddings = encode_prompts(text_encoder, batch.input_ids[start:end].to(device))
        loss = denoising_loss(
            unet,
            schedule,
            batch.latents[start:end].to(device, dtype),
            embeddings.to(dtype),
            batch.noise[start:end].to(device, dtype),
            batch.timesteps[start:end],
        )
        total += float(loss) * (end - start)
        count += end - start
    return total / count
