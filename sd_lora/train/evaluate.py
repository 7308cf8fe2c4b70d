"""A fixed evaluation loss: the same images, captions, timesteps and noise every time it is computed,
so two numbers (before/after training, with/without an adapter) are directly comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sd_lora.models.text import default_time_ids, encode_all, tokenize_all
from sd_lora.models.vae import encode_posterior, scale_latents
from sd_lora.objective import denoising_loss

EVAL_TIMESTEPS = (100, 300, 500, 700, 900)  # spread over the schedule; each image gets every one
EVAL_CHUNK = 8  # rows (image x timestep) a forward pass: bounds memory


@dataclass(frozen=True)
class EvalBatch:
    latents: torch.Tensor  # (N, 4, h, w) scaled latents, N = images x timesteps
    input_ids: torch.Tensor  # (N, E, 77), E text encoders
    timesteps: torch.Tensor  # (N,)
    noise: torch.Tensor  # (N, 4, h, w)
    time_ids: torch.Tensor  # (N, 6) SDXL's size conditioning (other bases ignore it)

    @property
    def images(self) -> int:
        """How many images it holds (each is repeated once per timestep)."""
        return self.latents.shape[0] // max(1, len(set(self.timesteps.tolist())))


def eval_chunks(images: int, timesteps: int = len(EVAL_TIMESTEPS)) -> int:
    """The forward passes `eval_loss` makes over `images` images: a progress bar's total."""
    return -(-images * timesteps // EVAL_CHUNK)


@torch.no_grad()
def make_eval_batch(
    pixel_values: torch.Tensor,  # (n, 3, H, W) in [-1, 1]
    captions: list[str],
    vae: torch.nn.Module,
    tokenizers,  # the pipe's tokenizer, or a list of them (SDXL: two)
    seed: int = 1234,
    timesteps: tuple[int, ...] = EVAL_TIMESTEPS,
) -> EvalBatch:
    """Encode the images once (latent mean, no sampling) and fix the noise from `seed`. SDXL's
    size conditioning is that of an uncropped image at the images' size, as when generating."""
    latents = scale_latents(vae, encode_posterior(vae, pixel_values)[0])
    k = len(timesteps)
    latents = latents.repeat_interleave(k, dim=0)
    input_ids = tokenize_all(_as_list(tokenizers), captions).repeat_interleave(k, dim=0)
    steps = torch.tensor(timesteps, dtype=torch.long).repeat(len(captions))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    height, width = pixel_values.shape[-2:]
    time_ids = default_time_ids(latents.shape[0], int(height), int(width))
    return EvalBatch(latents=latents.cpu(), input_ids=input_ids, timesteps=steps, noise=noise,
                     time_ids=time_ids)


def _as_list(one_or_many) -> list:
    return list(one_or_many) if isinstance(one_or_many, (list, tuple)) else [one_or_many]


@torch.no_grad()
def eval_loss(
    unet: torch.nn.Module,
    text_encoders,  # the pipe's text encoder, or a list of them (SDXL: two)
    schedule,
    batch: EvalBatch,
    chunk: int = EVAL_CHUNK,
    advance=None,  # called with 1 after each chunk (a progress bar's update), if given
) -> float:
    """Mean denoising loss over the batch, in chunks to bound memory."""
    unet_param = next(unet.parameters())
    device, dtype = unet_param.device, unet_param.dtype
    total, count = 0.0, 0
    size = batch.latents.shape[0]
    for start in range(0, size, chunk):
        end = min(start + chunk, size)
        embeddings = encode_all(_as_list(text_encoders), batch.input_ids[start:end].to(device),
                                batch.time_ids[start:end])
        loss = denoising_loss(
            unet,
            schedule,
            batch.latents[start:end].to(device, dtype),
            embeddings.to(dtype=dtype),
            batch.noise[start:end].to(device, dtype),
            batch.timesteps[start:end],
        )
        total += float(loss) * (end - start)
        count += end - start
        if advance is not None:
            advance(1)
    return total / count
