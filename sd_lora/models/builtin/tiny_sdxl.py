"""Tiny SD 2.x- and SDXL-topology pipelines, the counterparts of `sd_lora.models.builtin.tiny` (SD 1.x).

SD 2.x, the same block structure as SD 2.1: linear projections in the transformer blocks, attention heads
of a fixed width (SD 2 uses 64 channels a head; here 8), upcast attention like the 768-v model,
and an OpenCLIP-style text encoder (`gelu`, pad token "!") whose cross-attention states come from
the penultimate layer, which diffusers expresses by keeping one layer fewer than the checkpoint.

SDXL, the same block structure as SDXL base 1.0: three levels (no attention in the first), more
transformer layers in the deeper levels (1, 1, 2 here; SDXL: 1, 2, 10), linear projections, two
text encoders (CLIP ViT-L and OpenCLIP ViT-bigG, the second with a text projection) whose
penultimate hidden states are concatenated, and the `text_time` added embedding that reads the
second encoder's pooled output and the six size numbers. Its module names are SDXL's.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_lora.models.builtin.tiny import (
    TINY_RESOLUTION,
    clip_text_config,
    sd1_scheduler_config,
    tiny_unet_config,
    tiny_vae_config,
)
from sd_lora.models.tokenizers import clip_tokenizer, open_clip_tokenizer

TINY_SD2_HEAD_WIDTH = 8  # channels per attention head (SD 2.x: 64)


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


SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim per size number (SDXL: 256)
# The two encoders' widths (SDXL: 768, 1280). They must differ: diffusers' single-file loader
# tells SDXL's two encoders apart in a checkpoint by their widths.
SDXL_TEXT_WIDTHS = (32, 48)


def tiny_sdxl_unet_config() -> dict:
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(4, 8, 8),  # heads, as SDXL's config counts them (8 channels each)
        cross_attention_dim=sum(SDXL_TEXT_WIDTHS),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_TEXT_WIDTHS[1],
        norm_num_groups=16,
    )


def tiny_sdxl_text_encoder_2_config() -> CLIPTextConfig:
    return clip_text_config(hidden_size=SDXL_TEXT_WIDTHS[1], intermediate_size=64,
                            num_hidden_layers=3, hidden_act="gelu", pad_token_id=0)


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build the tiny SDXL pipeline; the same seed always gives the same weights."""
    vae_config = dict(tiny_vae_config(), scaling_factor=0.13025)  # SDXL's VAE scaling
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(
            clip_text_config(hidden_size=SDXL_TEXT_WIDTHS[0], intermediate_size=64,
                             num_hidden_layers=3))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_sdxl_text_encoder_2_config())
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=open_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**sd1_scheduler_config("epsilon")),
        add_watermarker=False,
    )
