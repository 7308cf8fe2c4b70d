"""The built-in `toy` base: a small SD 1.x-topology pipeline pretrained on the toy world.

Unlike `tiny` (random weights, for plumbing tests), `toy` draws what its prompt says: "two red
circles on a blue background" gives two red circles on blue, most of the time (its measured
accuracy is in `recipe.json` beside the weights). It is a diffusers folder in the package
(`sd_lora/assets/toy/`, ~17 MB in float16), so diffusers' own `from_pretrained` loads it too.

Architecture, chosen to train on a laptop CPU: a 4x VAE (64 px images -> 16x16x4 latents), a
UNet with SD 1.x's block pattern (three cross-attention down blocks and a plain one) but one layer
per block, and a 3-layer CLIP text encoder with the real CLIP tokenizer. Rebuild it with
`python -m sd_lora.world.pretrain` (recipe and cost in that module and in recipe.json).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import CLIPTextConfig

from sd_lora.models.builtin.tiny import clip_text_config

TOY_RESOLUTION = 64  # pixels; latents are 16x16
TOY_BASE_NAME = "toy"


def toy_base_path() -> Path:
    return Path(str(resources.files("sd_lora") / "assets" / "toy"))


def toy_vae_config() -> dict:
    return dict(
        sample_size=TOY_RESOLUTION,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=1.0,  # set from the latents' spread when pretraining
    )


def toy_unet_config() -> dict:
    return dict(
        sample_size=TOY_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 96, 128),
        layers_per_block=1,
        attention_head_dim=4,  # like SD 1.x, this is the number of heads
        cross_attention_dim=64,
        norm_num_groups=16,
    )


def toy_text_encoder_config() -> CLIPTextConfig:
    return clip_text_config(hidden_size=64, intermediate_size=256, num_hidden_layers=3)
