"""The built-in `tiny` base: an SD 1.x-topology pipeline with random weights, built from configs.

It has the same block structure as SD 1.5 (three cross-attention down blocks and a plain one, two
layers per block, a CLIP text encoder, an 8x VAE), so module names and LoRA keys are exactly those
of a real SD 1.x model, but it has ~3M parameters and runs a training step in well under a
second on a CPU. Weights are deterministic from the seed; the tokenizer is the real CLIP BPE.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from sd_lora.models.tokenizers import clip_tokenizer

TINY_RESOLUTION = 64  # pixels; latents are 8x8


def tiny_unet_config(cross_attention_dim: int = 32) -> dict:
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        attention_head_dim=4,  # like SD 1.x, this is the number of heads
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=16,
    )


def tiny_vae_config() -> dict:
    return dict(
        sample_size=TINY_RESOLUTION,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        scaling_factor=0.18215,
    )


def clip_text_config(
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    hidden_act: str = "quick_gelu",
    pad_token_id: int = 49407,
) -> CLIPTextConfig:
    """A CLIP text encoder of the given size that fits the real CLIP tokenizer: its vocabulary,
    77-token window and special tokens (OpenCLIP, for SD 2, pads with 0)."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
    )


def tiny_text_encoder_config() -> CLIPTextConfig:
    return clip_text_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2)


def sd1_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """The noise schedule of SD 1.x (and 2.x): scaled-linear betas over 1000 steps."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """Build the tiny pipeline; the same seed always gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config())
        vae = AutoencoderKL(**tiny_vae_config())
        text_encoder = CLIPTextModel(tiny_text_encoder_config())
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**sd1_scheduler_config(prediction_type)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
