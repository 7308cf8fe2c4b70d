"""Read what a single-file LDM checkpoint is from its safetensors header alone.

`read_header` takes tensor names and shapes without loading tensor data; `detect_family` tells SD
1.x / 2.x / SDXL apart by their text-encoder keys, and SD3 / SD3.5 by its MMDiT's `joint_blocks`; `infer_*_fields` derive the diffusers config
fields that the shapes determine (widths, block counts, attention placement, cross-attention
width, text-encoder size); `expected_shapes` builds a config's models on the meta device and
converts them with `ldm_checkpoint`, so `shape_mismatches` compares a config against a file
exactly, key by key, without allocating a full-size model.

Fields the shapes cannot tell (attention heads, GroupNorm groups, activation, VAE scaling) come
from the caller: the file's own `sd_lora.configs` metadata or the SD conventions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_lora.formats.ldm_checkpoint import (
    CONFIGS_METADATA_KEY,
    OPEN_CLIP_PREFIX,
    SD1_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    components_to_ldm,
)

SD1_TEXT = SD1_CLIP_PREFIX + "text_model."
SDXL_MARKER = "conditioner.embedders."
SD3_MARKER = UNET_PREFIX + "joint_blocks."  # the MMDiT's blocks (formats.sd3_checkpoint)
# Present in some files, absent in others, read by no SD 1/2 loader: never compared.
OPTIONAL_KEYS = frozenset(
    {
        SD1_TEXT + "embeddings.position_ids",
        SDXL_CLIP_PREFIX + "text_model.embeddings.position_ids",
        OPEN_CLIP_PREFIX + "text_projection",
        OPEN_CLIP_PREFIX + "logit_scale",
    }
)
COMPONENT_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", SDXL_MARKER)


class HeaderError(ValueError):
    """The header does not describe a loadable SD 1.x / 2.x / SDXL checkpoint; the message says why."""


@dataclass(frozen=True)
class Header:
    path: Path
    shapes: dict[str, tuple[int, ...]]  # normalised names (SD 1 text keys with `text_model.`)
    metadata: dict[str, str] = field(default_factory=dict)

    def configs_metadata(self) -> dict | None:
        """The diffusers configs that `save_single_file` stores, when this file has them."""
        raw = self.metadata.get(CONFIGS_METADATA_KEY)
        return json.loads(raw) if raw else None


def read_header(path: str | Path) -> Header:
    """Tensor names, shapes and metadata of a .safetensors file; no tensor data is read."""
    with safe_open(str(path), framework="pt") as f:
        shapes = {_normalise(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        metadata = dict(f.metadata() or {})
    return Header(Path(path), shapes, metadata)


def _normalise(key: str) -> str:
    """Old SD 1 files omit CLIP's `text_model.` level (`cond_stage_model.transformer.encoder...`)."""
    if key.startswith(SD1_CLIP_PREFIX) and not key.startswith(SD1_TEXT):
        return SD1_TEXT + key[len(SD1_CLIP_PREFIX) :]
    return key


def detect_family(header: Header) -> str:
    """'sd1', 'sd2' or 'sdxl' from the text-encoder keys, 'sd3' from the MMDiT's blocks;
    raises HeaderError for anything else."""
    keys = header.shapes.keys()
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if any(k.startswith(SD3_MARKER) for k in keys):
        family = "sd3"  # its text encoders are optional here: the SD3 loader says what is missing
    elif any(k.startswith("joint_blocks.") for k in keys):
        raise HeaderError(
            "it holds an SD3 transformer alone (joint_blocks.* without model.diffusion_model.), "
            "no VAE or text encoders; pass a full checkpoint (sd3.5_large.safetensors) or the "
            "diffusers folder of an SD 3.5 model"
        )
    elif any(k.startswith(SDXL_MARKER) for k in keys):
        family = "sdxl"
    elif any(k.startswith(OPEN_CLIP_PREFIX + "transformer.resblocks.") for k in keys):
        family = "sd2"
    elif any(k.startswith(SD1_TEXT) for k in keys):
        family = "sd1"
    elif any(k.startswith("lora_") or ".lora_down." in k or ".lora_A." in k for k in keys):
        raise HeaderError("it holds LoRA weights, not a base model; pass it as an adapter instead")
    elif has_unet:
        raise HeaderError(
            "it has a UNet (model.diffusion_model.*) but no text encoder (cond_stage_model.*)"
        )
    elif any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys):
        raise HeaderError(
            "it looks like one diffusers component, not a whole checkpoint; pass the diffusers "
            "folder that holds model_index.json instead"
        )
    else:
        raise HeaderError(
            f"it is not a Stable Diffusion checkpoint (first keys: {sorted(keys)[:3]})"
        )
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE")):
        if not any(k.startswith(prefix) for k in keys):
            raise HeaderError(
                f"it has no {what} ({prefix}*); single-file bases must be full checkpoints"
            )
    return family


# --- inference from shapes ------------------------------------------------------------------


def _strip(shapes: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}


def _indices(keys, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)})


def _need(shapes: dict, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise HeaderError(f"expected tensor {key!r} is missing")
    return shapes[key]


def infer_unet_fields(shapes: dict) -> dict:
    """UNet2DConditionModel config fields that the `model.diffusion_model.*` shapes determine."""
    h = _strip(shapes, UNET_PREFIX)
    inputs = _indices(h, "input_blocks.")
    downsamples = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in h]
    per_block = downsamples[0] - 1 if downsamples else len(inputs) - 1
    levels = len(downsamples) + 1
    if per_block < 1 or inputs != list(range(levels * (per_block + 1))):
        raise HeaderError(f"irregular UNet input blocks {inputs} (downsampling at {downsamples})")
    channels, down_types, up_types = [], [], []
    for level in range(levels):
        first = 1 + level * (per_block + 1)
        channels.append(_need(h, f"input_blocks.{first}.0.out_layers.3.weight")[0])
        attn = f"input_blocks.{first}.1.proj_in.weight" in h
        down_types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        attn = f"output_blocks.{level * (per_block + 1)}.1.proj_in.weight" in h
        up_types.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")
    proj_in = [k for k in h if k.endswith(".proj_in.weight")]
    to_k = [k for k in h if k.endswith(".attn2.to_k.weight")]
    if not proj_in or not to_k or "middle_block.1.proj_in.weight" not in h:
        raise HeaderError("the UNet has no cross-attention transformer blocks where SD has them")
    first_attn = proj_in[0].removesuffix("proj_in.weight")
    depth = len(_indices(h, first_attn + "transformer_blocks."))
    fields = dict(
        in_channels=_need(h, "input_blocks.0.0.weight")[1],
        out_channels=_need(h, "out.2.weight")[0],
        block_out_channels=channels,
        layers_per_block=per_block,
        down_block_types=down_types,
        up_block_types=up_types,
        cross_attention_dim=h[to_k[0]][1],
        use_linear_projection=len(h[proj_in[0]]) == 2,
    )
    if depth != 1:
        fields["transformer_layers_per_block"] = depth
    return fields


def infer_vae_fields(shapes: dict) -> dict:
    """AutoencoderKL config fields that the `first_stage_model.*` shapes determine."""
    h = _strip(shapes, VAE_PREFIX)
    levels = _indices(h, "encoder.down.")
    if not levels:
        raise HeaderError("the VAE has no encoder.down.* blocks")
    return dict(
        in_channels=_need(h, "encoder.conv_in.weight")[1],
        out_channels=_need(h, "decoder.conv_out.weight")[0],
        latent_channels=_need(h, "decoder.conv_in.weight")[1],
        block_out_channels=[_need(h, f"encoder.down.{i}.block.0.conv2.weight")[0] for i in levels],
        layers_per_block=len(_indices(h, "encoder.down.0.block.")),
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
    )


def infer_text_encoder_fields(shapes: dict, family: str) -> dict:
    """CLIPTextConfig fields from the CLIP (SD 1) or OpenCLIP (SD 2) text-encoder shapes.

    SD 2 conditions on OpenCLIP's penultimate layer, so its diffusers encoder has one layer
    fewer than the checkpoint's `resblocks`.
    """
    if family == "sd1":
        h = _strip(shapes, SD1_TEXT)
        vocab, width = _need(h, "embeddings.token_embedding.weight")
        positions = _need(h, "embeddings.position_embedding.weight")[0]
        layers = len(_indices(h, "encoder.layers."))
        intermediate = _need(h, "encoder.layers.0.mlp.fc1.weight")[0]
    else:
        h = _strip(shapes, OPEN_CLIP_PREFIX)
        vocab, width = _need(h, "token_embedding.weight")
        positions = _need(h, "positional_embedding")[0]
        layers = len(_indices(h, "transformer.resblocks.")) - 1
        intermediate = _need(h, "transformer.resblocks.0.mlp.c_fc.weight")[0]
    return dict(
        vocab_size=vocab,
        hidden_size=width,
        max_position_embeddings=positions,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
    )


# --- exact comparison -----------------------------------------------------------------------


def expected_shapes(unet: dict, vae: dict, text_encoder: dict, family: str,
                    text_encoder_2: dict | None = None) -> dict[str, tuple]:
    """The LDM key -> shape table that these diffusers configs produce (built on `meta`);
    SDXL's second text encoder from `text_encoder_2`."""
    with torch.device("meta"):
        models = (
            UNet2DConditionModel.from_config(unet),
            AutoencoderKL.from_config(vae),
            CLIPTextModel(CLIPTextConfig.from_dict(text_encoder)),
        )
        second = (CLIPTextModelWithProjection(CLIPTextConfig.from_dict(text_encoder_2))
                  if text_encoder_2 is not None else None)
    return {k: tuple(v.shape) for k, v in components_to_ldm(*models, family, second).items()}


def _same_shape(key: str, a: tuple, b: tuple) -> bool:
    if a == b:
        return True
    # VAE attention weights are 1x1 convs in LDM files but plain matrices in a few converted ones.
    return ".mid.attn_1." in key and tuple(d for d in a if d != 1) == tuple(d for d in b if d != 1)


def shape_mismatches(header: Header, expected: dict[str, tuple]) -> list[str]:
    """Human-readable differences between a file's component tensors and `expected`."""
    have = {
        k: v
        for k, v in header.shapes.items()
        if k.startswith(COMPONENT_PREFIXES) and k not in OPTIONAL_KEYS
    }
    want = {k: v for k, v in expected.items() if k not in OPTIONAL_KEYS}
    problems = [f"missing {k} {want[k]}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected {k} {have[k]}" for k in sorted(have.keys() - want.keys())]
    problems += [
        f"{k}: file {have[k]} vs config {want[k]}"
        for k in sorted(want.keys() & have.keys())
        if not _same_shape(k, have[k], want[k])
    ]
    return problems
