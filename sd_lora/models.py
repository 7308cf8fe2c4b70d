"""Load a base model: the built-in tiny one, a local diffusers folder, a hub id, or a single file.

Every loaded pipeline is frozen (no parameter requires grad) and in eval mode; training code adds
LoRA layers on top.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from sd_lora.tiny import build_tiny_pipeline

BUILTIN_BASES = ("tiny",)
PREDICTION_TYPES = ("epsilon", "v_prediction")


class BaseModelError(ValueError):
    """A base model that cannot be found or loaded; the message says what to do."""


def load_pipeline(
    base: str, *, dtype: torch.dtype = torch.float32, prediction_type: str | None = None
) -> DiffusionPipeline:
    """Load `base` frozen, in `dtype`; `prediction_type` overrides the scheduler's when given."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise BaseModelError(
            f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
        )
    if base == "tiny":
        pipe = build_tiny_pipeline()
    elif Path(base).is_dir():
        pipe = _load_folder(Path(base), dtype)
    else:
        raise BaseModelError(
            f"base {base!r} is not a built-in base {BUILTIN_BASES} or an existing diffusers folder"
        )
    if prediction_type is not None:
        pipe.scheduler.register_to_config(prediction_type=prediction_type)
    return freeze(pipe.to(dtype=dtype))


def _load_folder(path: Path, dtype: torch.dtype) -> DiffusionPipeline:
    if not (path / "model_index.json").is_file():
        raise BaseModelError(
            f"{path} is a folder but not a diffusers pipeline (no model_index.json); "
            "pass the folder that `save_pretrained` wrote"
        )
    return StableDiffusionPipeline.from_pretrained(
        path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )


def freeze(pipe: DiffusionPipeline) -> DiffusionPipeline:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return pipe


def model_family(pipe: DiffusionPipeline) -> str:
    """'sdxl' (two text encoders), 'sd2' (1024-wide OpenCLIP conditioning) or 'sd1'."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if pipe.unet.config.cross_attention_dim == 1024:
        return "sd2"
    return "sd1"


def prediction_type_of(pipe: DiffusionPipeline) -> str:
    return pipe.scheduler.config.get("prediction_type", "epsilon")
