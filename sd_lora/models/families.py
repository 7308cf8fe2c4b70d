"""What a loaded pipeline is: its family (SD 1.x, 2.x, SDXL), prediction type and native size;
freezing it."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def freeze(pipe: DiffusionPipeline) -> DiffusionPipeline:
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return pipe


def model_family(pipe: DiffusionPipeline) -> str:
    """'sdxl' (two text encoders), 'sd2' or 'sd1'.

    SD 2.x is told apart structurally: its UNet's transformer blocks project in and out with
    Linear layers (SD 1.x: 1x1 convolutions), which also holds for tiny SD 2-topology models;
    a 1024-wide cross-attention (OpenCLIP ViT-H) counts too.
    """
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    unet = pipe.unet
    proj_in = next((m for n, m in unet.named_modules() if n.endswith("proj_in")), None)
    if isinstance(proj_in, torch.nn.Linear) or unet.config.cross_attention_dim == 1024:
        return "sd2"
    return "sd1"


def prediction_type_of(pipe: DiffusionPipeline) -> str:
    return pipe.scheduler.config.get("prediction_type", "epsilon")


def native_resolution(pipe) -> int:
    """The image size the base was made for, in pixels: its UNet's latent size times the VAE's
    factor (SD 1.5: 512, SDXL: 1024, the toy and tiny bases: 64)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
