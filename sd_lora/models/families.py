"""What a loaded pipeline is: its family (SD 1.x, 2.x, SDXL, SD3), denoiser, prediction type and
native size; freezing it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the family is read off a loaded pipeline; naming its class needs no import
    from diffusers import DiffusionPipeline

COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
# SD3 is trained with rectified flow: the transformer predicts (noise - image), which no
# DDPM prediction type names.
FLOW = "flow"


def freeze(pipe: DiffusionPipeline) -> DiffusionPipeline:
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return pipe


def model_family(pipe: DiffusionPipeline) -> str:
    """'sd3' (an MMDiT transformer), 'sdxl' (two text encoders), 'sd2' or 'sd1'.

    SD 2.x is told apart structurally: its UNet's transformer blocks project in and out with
    Linear layers (SD 1.x: 1x1 convolutions), which also holds for tiny SD 2-topology models;
    a 1024-wide cross-attention (OpenCLIP ViT-H) counts too.
    """
    if getattr(pipe, "transformer", None) is not None:
        return "sd3"
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    unet = pipe.unet
    proj_in = next((m for n, m in unet.named_modules() if n.endswith("proj_in")), None)
    if isinstance(proj_in, torch.nn.Linear) or unet.config.cross_attention_dim == 1024:
        return "sd2"
    return "sd1"


def denoiser_name(pipe: DiffusionPipeline) -> str:
    """The component that denoises: "transformer" (SD3) or "unet"; the key of its LoRA in an
    AdapterState and of its model in the training loop's dicts."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def denoiser_of(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The UNet, or SD3's MMDiT transformer."""
    return getattr(pipe, denoiser_name(pipe))


def model_variant(pipe: DiffusionPipeline) -> str | None:
    """SD3's variant, as sd-scripts names it from the MMDiT's structure: "5-medium" (MMDiT-X
    blocks with a second self-attention), "5-large" (QK norms, no MMDiT-X), "medium" (SD3
    Medium: no QK norms). None for the UNet families."""
    if model_family(pipe) != "sd3":
        return None
    config = pipe.transformer.config
    if not config.get("qk_norm"):
        return "medium"
    return "5-medium" if config.get("dual_attention_layers") else "5-large"


def prediction_type_of(pipe: DiffusionPipeline) -> str:
    if model_family(pipe) == "sd3":
        return FLOW
    return pipe.scheduler.config.get("prediction_type", "epsilon")


def native_resolution(pipe) -> int:
    """The image size the base was made for, in pixels: its denoiser's latent size times the
    VAE's factor (SD 1.5: 512, SDXL and SD3.5: 1024, the toy and tiny bases: 64)."""
    return int(denoiser_of(pipe).config.sample_size) * int(pipe.vae_scale_factor)
