"""A tiny SD 2.x-topology pipeline, the SD 2 counterpart of `sd_lora.tiny` (SD 1.x).

Same block structure as SD 2.1: linear projections in the transformer blocks, attention heads
of a fixed width (SD 2 uses 64 channels a head; here 8), upcast attention like the 768-v model,
and an OpenCLIP-style text encoder (`gelu`, pad token "!") whose cross-attention states come from
the penultimate layer, which diffusers expresses by keeping one layer fewer than the checkpoint.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sd_lora.tiny import (
    TINY_RESOLUTION,
    clip_text_config,
    clip_tokenizer,
    sd1_scheduler_config,
    tiny_unet_config,
    tiny_vae_config,
)

TINY_SD2_HEAD_WIDTH = 8  # channels per attention head (SD 2.x: 64)


def open_clip_tokenizer() -> CLIPTokenizer:
    """SD 2.x's tokenizer: the same BPE vocabulary as CLIP, padding with "!" (id 0) like OpenCLIP."""
    tokenizer = clip_tokenizer()
    tokenizer.pad_token = "!"
    return tokenizer


def tiny_sd2_unet_config() -> dict:
    config = tiny_unet_config(cross_attention_dim=32)
    config.update(
        attention_head_dim=[c // TINY_SD2_HEAD_WIDTH for c in config["block_out_channels"]],
        use_linear_projection=True,
        upcast_attention=True,
    )
    return config


def tiny_sd2_text_encoder_config() -> CLIPTextConfig:
    # The checkpoint holds 3 layers: SD 2 drops OpenCLIP's last one.
    return clip_text_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            hidden_act="gelu", pad_token_id=0)


def build_tiny_sd2_pipeline(
    seed: int = 0, prediction_type: str = "v_prediction"
) -> StableDiffusionPipeline:
    """Build the tiny SD 2.x pipeline; the same seed always gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_sd2_unet_config())
        vae = AutoencoderKL(**tiny_vae_config())
        text_encoder = CLIPTextModel(tiny_sd2_text_encoder_config())
    assert unet.config.sample_size * 8 == TINY_RESOLUTION
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=open_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**sd1_scheduler_config(prediction_type)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
