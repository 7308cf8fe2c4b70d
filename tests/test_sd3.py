"""Stable Diffusion 3 / 3.5: the MMDiT transformer, three text encoders, rectified flow.

The tiny SD3 pipeline (`tiny-sd3`) has SD3.5 Medium's structure (both streams, MMDiT-X blocks
with `attn2`, a context_pre_only last block, CLIP-L, CLIP-G and a small T5 with a working
tokenizer), so its module names and LoRA keys are a real SD3.5 model's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd_lora.config import load_config
from sd_lora.models.families import model_family, model_variant, prediction_type_of
from sd_lora.models.load import load_pipeline
from sd_lora.models.text import encode_all, text_encoders_of, tokenize_all, tokenizers_of
from tests.lora_helpers import killed_then_resumed, train_keeping_loop

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"
FP32_TOLERANCE = 1e-5
PROMPTS = ["zkstripes, a red circle", "two blue squares"]


@torch.no_grad()
def sd3_outputs(pipe) -> dict[str, torch.Tensor]:
    """The conditioning (all three encoders) and the transformer's prediction for fixed prompts,
    latents and noise levels."""
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 16, 8, 8, generator=gen)
    conditioning = encode_all(text_encoders_of(pipe), tokenize_all(tokenizers_of(pipe), PROMPTS))
    prediction = pipe.transformer(hidden_states=latents, timestep=torch.tensor([250.0, 750.0]),
                                  encoder_hidden_states=conditioning.hidden_states,
                                  pooled_projections=conditioning.pooled).sample
    return {"hidden": conditioning.hidden_states, "pooled": conditioning.pooled,
            "prediction": prediction}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def sd3_job(tmp_path, *extra):
    return load_config(None, [
        'model.base="tiny-sd3"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{tmp_path}"',
        "train.name=sd3", "train.max_steps=4", "train.batch_size=2", "train.checkpoint_every=0",
        "sample.steps=2", "sample.every=0", 'export.formats=["kohya", "diffusers"]',
        'export.dtype="fp32"', "train.learning_rate=1e-2", "train.text_encoder_learning_rate=1e-2",
        "report.enabled=false", *extra,
    ])


def test_tiny_sd3_is_an_sd35_medium_shaped_flow_model():
    pipe = load_pipeline("tiny-sd3")
    assert (model_family(pipe), model_variant(pipe), prediction_type_of(pipe)) == ("sd3", "5-medium", "flow")
    names = {n for n, _ in pipe.transformer.named_modules()}
    assert {"transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn.add_q_proj",
            "transformer_blocks.2.attn.to_q"} <= names
    assert "transformer_blocks.2.attn.to_add_out" not in names  # the last block: context_pre_only
    ids = tokenize_all(tokenizers_of(pipe), PROMPTS)
    assert ids.shape == (2, 3, 256)
    ours = encode_all(text_encoders_of(pipe), ids)
    theirs = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False)
    assert torch.equal(ours.hidden_states, theirs[0]) and torch.equal(ours.pooled, theirs[2])


def test_tiny_sd3_trains_and_diffusers_loads_its_exports_like_the_trained_model(tmp_path):
    result, loop = train_keeping_loop(sd3_job(tmp_path))
    groups = [g["lr"] for g in loop.trainee.optimizer.param_groups]
    assert list(loop.trainee.trained) == ["transformer", "text_encoder", "text_encoder_2"]
    assert groups == [1e-2, 1e-2, 1e-2]
    want = sd3_outputs(loop.trainee.pipe)
    assert max_diff(want, sd3_outputs(load_pipeline("tiny-sd3"))) > 1e-3  # it learned something
    with safe_open(str(result.adapter_files["diffusers"]), "pt") as f:
        keys = set(f.keys())
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.attn2.to_q.lora_B.weight" in keys
    for fmt in ("diffusers",):
        fresh = load_pipeline("tiny-sd3")
        fresh.load_lora_weights(str(result.adapter_files[fmt]))
        diff = max_diff(sd3_outputs(fresh), want)
        print(f"{fmt}: diffusers' StableDiffusion3Pipeline vs the trained model {diff:.1e}")
        assert diff < FP32_TOLERANCE, fmt
