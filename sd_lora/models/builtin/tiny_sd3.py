"""The built-in `tiny-sd3` base: a Stable Diffusion 3.5-topology pipeline with random weights.

The same structure as SD3.5 Medium, shrunk: an MMDiT transformer whose blocks attend jointly
over an image stream and a text stream, with MMDiT-X's extra image self-attention (`attn2`)
in the first blocks and a last block that reads the text without updating it (SD3's
`context_pre_only`); three text encoders (CLIP-L and CLIP-G, both with text projections, and a
small T5 encoder with a working tokenizer built offline, `models.tokenizers.tiny_t5_tokenizer`);
a 16-channel VAE with SD3's latent shift and scale; the rectified-flow scheduler with SD3's
shift of 3. Module names, and so LoRA keys, are exactly SD3.5's. Weights are deterministic
from the seed.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd_lora.models.builtin.tiny import TINY_RESOLUTION, clip_text_config, tiny_vae_config
from sd_lora.models.tokenizers import clip_tokenizer, open_clip_tokenizer, tiny_t5_tokenizer

# CLIP-L and CLIP-G widths (SD3: 768, 1280): their penultimate states are concatenated and
# zero-padded to T5's width (SD3: 4096), which the transformer's context_embedder reads; their
# projected pooled outputs are concatenated too (SD3: 2048).
SD3_CLIP_WIDTHS = (32, 48)
SD3_T5_WIDTH = 96
SD3_LATENT_CHANNELS = 16
SD3_VAE_SHIFT, SD3_VAE_SCALE = 0.0609, 1.5305  # SD3's VAE: latents = (z - shift) * scale


def tiny_sd3_transformer_config() -> dict:
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        patch_size=2,
        in_channels=SD3_LATENT_CHANNELS,
        out_channels=SD3_LATENT_CHANNELS,
        num_layers=3,  # the last one is context_pre_only, as in SD3
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=SD3_T5_WIDTH,
        caption_projection_dim=32,  # = heads x head width, as in SD3
        pooled_projection_dim=sum(SD3_CLIP_WIDTHS),
        pos_embed_max_size=32,  # patches a side: up to 512 px
        dual_attention_layers=(0, 1),  # MMDiT-X (SD3.5 Medium: blocks 0-12)
        qk_norm="rms_norm",
    )


def tiny_sd3_vae_config() -> dict:
    return dict(tiny_vae_config(), latent_channels=SD3_LATENT_CHANNELS,
                scaling_factor=SD3_VAE_SCALE, shift_factor=SD3_VAE_SHIFT,
                use_quant_conv=False, use_post_quant_conv=False)


def tiny_t5_config() -> T5Config:
    """A T5 v1.1-style encoder (gated GELU, like T5-XXL) over the tiny T5 vocabulary."""
    return T5Config(vocab_size=len(tiny_t5_tokenizer()), d_model=SD3_T5_WIDTH, d_kv=8, d_ff=64,
                    num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                    feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def sd3_scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, shift=3.0)


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """Build the tiny SD3 pipeline; the same seed always gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**tiny_sd3_transformer_config())
        vae = AutoencoderKL(**tiny_sd3_vae_config())
        text_encoder = CLIPTextModelWithProjection(clip_text_config(
            hidden_size=SD3_CLIP_WIDTHS[0], intermediate_size=64, num_hidden_layers=3))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(
            hidden_size=SD3_CLIP_WIDTHS[1], intermediate_size=64, num_hidden_layers=3,
            hidden_act="gelu", pad_token_id=0))
        text_encoder_3 = T5EncoderModel(tiny_t5_config())
    # SD3 reads CLIP-L's pooled output unprojected (SAI's reference code; diffusers' SD3 bases
    # and its single-file converter give CLIP-L an identity projection): so does this one.
    text_encoder.text_projection.weight.data = torch.eye(SD3_CLIP_WIDTHS[0])
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**sd3_scheduler_config()),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=open_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_t5_tokenizer(),
    )
