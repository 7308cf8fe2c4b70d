"""The SD3 / SD3.5 single-file layout (Stability's `sd3.5_large.safetensors`, ComfyUI), table-driven.

    model.diffusion_model.*                 the MMDiT transformer, original names (`formats.mmdit`)
    first_stage_model.*                     the 16-channel VAE, LDM names (`formats.ldm_checkpoint`)
    text_encoders.clip_l.transformer.*      CLIP-L, transformers' names (`text_model.` kept)
    text_encoders.clip_g.transformer.*      CLIP-G (OpenCLIP bigG), transformers' names, with its
                                            `text_projection.weight`
    text_encoders.t5xxl.transformer.*       the T5 v1.1 XXL encoder, transformers' names

The text encoders are in the "incl_clips" variants only. Two things are more than renames:
- the transformer's q/k/v are fused and two AdaLayerNormContinuous linears swap their row halves
  (see `formats.mmdit`); diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` is the
  authority, and `tests/test_sd3_memory_and_files.py` checks this module against it;
- SD3 reads CLIP-L's pooled output unprojected (Stability's reference code builds CLIP-L with
  `return_projected_pooled=False`; diffusers' single-file loader puts an identity matrix in
  `text_projection`, ComfyUI leaves it unused). The file has no CLIP-L projection to read
  (a stray one is ignored, as they all do), and none is written.

Every function is pure and works on meta tensors too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from sd_lora.formats import mmdit
from sd_lora.formats.ldm_checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    invert,
    map_module_name,
    vae_module_table,
    vae_to_ldm,
)

TRANSFORMER_PREFIX = UNET_PREFIX  # "model.diffusion_model."
TEXT_PREFIXES = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
PREFIXES = {"transformer": TRANSFORMER_PREFIX, "vae": VAE_PREFIX, **TEXT_PREFIXES}
TEXT_ROOT = "text_encoders."
# Written by some tools, read by none (position ids, OpenCLIP's temperature, CLIP-L's unused
# projection, T5's second name for its tied embedding): never compared, never required.
OPTIONAL_SUFFIXES = ("position_ids", "logit_scale")
CLIP_L_PROJECTION = TEXT_PREFIXES["text_encoder"] + "text_projection.weight"
T5_TIED = ("shared.weight", "encoder.embed_tokens.weight")
POS_EMBED = ("pos_embed.pos_embed", "pos_embed")  # a buffer in diffusers, a parameter originally


def component_of(key: str) -> str | None:
    """The pipeline component a file key belongs to ("transformer", "vae", "text_encoder", ...)."""
    for name, prefix in PREFIXES.items():
        if key.startswith(prefix):
            return name
    return None


def is_optional(key: str) -> bool:
    return (key.endswith(OPTIONAL_SUFFIXES) or key == CLIP_L_PROJECTION
            or key == TEXT_PREFIXES["text_encoder_3"] + T5_TIED[1])


# --- diffusers -> original (writing, and the expected shapes of a config) ---------------------


def transformer_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD3Transformer2DModel state dict -> `model.diffusion_model.*` in original MMDiT names:
    q/k/v concatenated into `qkv` (rows q, k, v), AdaLayerNormContinuous rows swapped."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key == POS_EMBED[0]:
            out[POS_EMBED[1]] = value
            continue
        module, _, param = key.rpartition(".")
        name = mmdit.original_name(module)
        if name.part is not None:
            fused.setdefault(f"{name.path}.{param}", {})[name.part] = value
            continue
        weight = state_dict[f"{module}.weight"]
        if weight.dim() == 2 and mmdit.swaps_scale_shift(module, *weight.shape):
            value = mmdit.swap_scale_shift(value)
        out[f"{name.path}.{param}"] = value
    for key, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise mmdit.MmditKeyError(f"{key}: q, k and v are not all in the state dict")
        out[key] = torch.cat([parts[0], parts[1], parts[2]])  # (3 * width, ...)
    return {TRANSFORMER_PREFIX + k: v for k, v in out.items()}


def clip_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's CLIPTextModel has no `text_model.` level (WithProjection keeps it):
    the file always has it."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
            for k, v in state_dict.items()}


def text_encoder_to_original(name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One text encoder's state dict -> its file keys (see the module doc for CLIP-L's projection
    and T5's tied embedding, written once as `shared.weight`)."""
    prefix = TEXT_PREFIXES[name]
    if name == "text_encoder_3":
        return {prefix + k: v for k, v in state_dict.items() if k != T5_TIED[1]}
    out = {prefix + k: v for k, v in clip_names(state_dict).items()}
    out.pop(CLIP_L_PROJECTION, None)
    return out


def components_to_original(transformer, vae, text_encoders: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """One SD3 single-file state dict from a pipeline's models; `text_encoders` maps
    "text_encoder", "text_encoder_2", "text_encoder_3" to a model or None (left out)."""
    out = transformer_to_original(transformer.state_dict())
    out.update(vae_to_ldm(vae.state_dict(), vae.config))
    for name, model in text_encoders.items():
        if model is not None:
            out.update(text_encoder_to_original(name, model.state_dict()))
    return out


# --- original -> diffusers (loading, one tensor at a time) ----------------------------------------


def transformer_from_original(key: str, value: torch.Tensor, width: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(diffusers key, tensor) pairs for one transformer tensor (`key` without the prefix):
    three for a fused qkv. `width` is the transformer's (heads x head width): the rows of the
    AdaLayerNormContinuous linears, whose halves are swapped, are 2 x width."""
    if key == POS_EMBED[1]:
        yield POS_EMBED[0], value
        return
    module, _, param = key.rpartition(".")
    paths = mmdit.diffusers_paths(module)
    if len(paths) == 3:
        for path, part in zip(paths, value.chunk(3, dim=0)):
            yield f"{path}.{param}", part.clone()
        return
    if mmdit.swaps_scale_shift(paths[0], value.shape[0], width):
        value = mmdit.swap_scale_shift(value)
    yield f"{paths[0]}.{param}", value


def vae_from_ldm(key: str, value: torch.Tensor, inverse_table: Mapping[str, str]) -> tuple[str, torch.Tensor]:
    """One `first_stage_model.` tensor (`key` without the prefix) in diffusers' AutoencoderKL
    names; `inverse_table` is `vae_inverse_table(config)`. The mid-block attention's 1x1
    convolutions become the Linear matrices diffusers has."""
    module, _, param = key.rpartition(".")
    name = f"{map_module_name(module, inverse_table)}.{param}"
    if ".mid.attn_1." in key and param == "weight" and value.dim() == 4:
        value = value.reshape(value.shape[0], value.shape[1])  # (C, C, 1, 1) -> (C, C)
    return name, value


def vae_inverse_table(config: Mapping) -> dict[str, str]:
    return invert(vae_module_table(config))


def text_encoder_from_original(name: str, key: str) -> list[str]:
    """The model keys one text-encoder tensor (`key` without the prefix) loads into: none for
    the optional ones, both names of T5's tied embedding."""
    if is_optional(TEXT_PREFIXES[name] + key) and key not in T5_TIED:
        return []
    if name == "text_encoder_3" and key in T5_TIED:
        return list(T5_TIED)
    return [key]
