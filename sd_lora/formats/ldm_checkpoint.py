"""The single-file LDM checkpoint layout (A1111, ComfyUI, the original SD repos), table-driven.

A diffusers pipeline's UNet, VAE and text encoder map onto one state dict:

    model.diffusion_model.*                   the UNet, in LDM module names (`input_blocks.4.1...`)
    first_stage_model.*                       the VAE
    cond_stage_model.transformer.text_model.* SD 1.x: the CLIP text encoder, names unchanged
    cond_stage_model.model.*                  SD 2.x: the OpenCLIP text encoder, q/k/v fused
    conditioner.embedders.0.transformer.text_model.*  SDXL: CLIP ViT-L, names unchanged
    conditioner.embedders.1.model.*           SDXL: OpenCLIP ViT-bigG, q/k/v fused, with its
                                              text_projection (transposed) and logit_scale

Module names are converted through prefix tables (`unet_module_table`, `vae_module_table`,
`open_clip_module_table`): the longest diffusers prefix of a name is replaced by its LDM
counterpart, and a name that no entry covers is an error, never a silent skip. The UNet table is
public because SDXL LoRA files name UNet layers in LDM form (`lora_unet_input_blocks_4_1_...`).

Every function here is pure and works on meta tensors too, so expected checkpoint shapes can be
computed for a full-size model without allocating it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sd_lora.errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."  # + "text_model." + transformers' names
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # + "text_model." + transformers' names
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# OpenCLIP's learned temperature; no text-to-image loader reads it, every SDXL file has it.
# ln(100): the value CLIP training ends at (it is clamped there).
LOGIT_SCALE = math.log(100.0)
CONFIGS_METADATA_KEY = "sd_lora.configs"  # JSON of the diffusers configs, written by us

# Inside a UNet resnet: diffusers name -> LDM name.
UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# OpenCLIP's text tower inside one residual block; q/k/v are fused into attn.in_proj_*.
OPEN_CLIP_LAYER_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


class UnmappedKeyError(KeyError):
    """A module name that the conversion table does not cover."""


# --- tables ---------------------------------------------------------------------------------


def _resnet_entries(diffusers: str, ldm: str) -> dict[str, str]:
    table = {diffusers: ldm}
    table.update({f"{diffusers}.{d}": f"{ldm}.{name}" for d, name in UNET_RESNET_RENAMES.items()})
    return table


def unet_module_table(config: Mapping) -> dict[str, str]:
    """Diffusers module prefix -> LDM module prefix for a UNet2DConditionModel `config`.

    Covers SD 1.x/2.x and SDXL layouts: any number of levels, `layers_per_block` resnets per
    down level (+1 per up level), attention where the block type has cross-attention, and SDXL's
    `add_embedding` (`label_emb`).
    """
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    per_block = int(config["layers_per_block"])
    levels = len(down_types)
    table = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    if config.get("addition_embed_type") == "text_time":
        table["add_embedding.linear_1"] = "label_emb.0.0"
        table["add_embedding.linear_2"] = "label_emb.0.2"
    for i, block_type in enumerate(down_types):
        for j in range(per_block):
            ldm = f"input_blocks.{1 + i * (per_block + 1) + j}"
            table.update(_resnet_entries(f"down_blocks.{i}.resnets.{j}", f"{ldm}.0"))
            if "CrossAttn" in block_type:
                table[f"down_blocks.{i}.attentions.{j}"] = f"{ldm}.1"
        if i < levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (
                f"input_blocks.{(i + 1) * (per_block + 1)}.0.op"
            )
    table.update(_resnet_entries("mid_block.resnets.0", "middle_block.0"))
    table["mid_block.attentions.0"] = "middle_block.1"
    table.update(_resnet_entries("mid_block.resnets.1", "middle_block.2"))
    for i, block_type in enumerate(up_types):
        has_attention = "CrossAttn" in block_type
        for j in range(per_block + 1):
            ldm = f"output_blocks.{i * (per_block + 1) + j}"
            table.update(_resnet_entries(f"up_blocks.{i}.resnets.{j}", f"{ldm}.0"))
            if has_attention:
                table[f"up_blocks.{i}.attentions.{j}"] = f"{ldm}.1"
        if i < levels - 1:
            last = f"output_blocks.{i * (per_block + 1) + per_block}"
            table[f"up_blocks.{i}.upsamplers.0.conv"] = f"{last}.{2 if has_attention else 1}.conv"
    return table


def vae_module_table(config: Mapping) -> dict[str, str]:
    """Diffusers module prefix -> LDM module prefix for an AutoencoderKL `config`."""
    levels = len(config["block_out_channels"])
    per_block = int(config["layers_per_block"])
    table = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = f"{part}.conv_in"
        table[f"{part}.conv_out"] = f"{part}.conv_out"
        table[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        for j in (0, 1):
            res = f"{part}.mid_block.resnets.{j}"
            table[res] = f"{part}.mid.block_{j + 1}"
            table[f"{res}.conv_shortcut"] = f"{part}.mid.block_{j + 1}.nin_shortcut"
        table[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
        for d, name in VAE_ATTENTION_RENAMES.items():
            table[f"{part}.mid_block.attentions.0.{d}"] = f"{part}.mid.attn_1.{name}"
    for i in range(levels):
        for j in range(per_block):
            res = f"encoder.down.{i}.block.{j}"
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = res
            table[f"encoder.down_blocks.{i}.resnets.{j}.conv_shortcut"] = f"{res}.nin_shortcut"
        up = levels - 1 - i  # LDM numbers decoder levels from the bottom
        for j in range(per_block + 1):
            res = f"decoder.up.{up}.block.{j}"
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = res
            table[f"decoder.up_blocks.{i}.resnets.{j}.conv_shortcut"] = f"{res}.nin_shortcut"
        if i < levels - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (
                f"encoder.down.{i}.downsample.conv"
            )
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    return table


def open_clip_module_table(num_layers: int) -> dict[str, str]:
    """CLIPTextModel module prefix -> OpenCLIP text-tower prefix (q/k/v handled by fusing)."""
    table = {
        "embeddings.token_embedding": "token_embedding",
        "final_layer_norm": "ln_final",
    }
    for i in range(num_layers):
        for d, name in OPEN_CLIP_LAYER_RENAMES.items():
            table[f"encoder.layers.{i}.{d}"] = f"transformer.resblocks.{i}.{name}"
    return table


def map_module_name(name: str, table: Mapping[str, str]) -> str:
    """Replace the longest prefix of module `name` found in `table`; raises if none covers it."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return ".".join([table[prefix], *parts[cut:]])
    raise UnmappedKeyError(f"no conversion entry covers {name!r}")


def invert(table: Mapping[str, str]) -> dict[str, str]:
    """The reverse table (LDM -> diffusers); the tables are one-to-one."""
    inverse = {ldm: diffusers for diffusers, ldm in table.items()}
    assert len(inverse) == len(table), "conversion table is not one-to-one"
    return inverse


def _map_key(key: str, table: Mapping[str, str]) -> str:
    module, _, param = key.rpartition(".")
    return f"{map_module_name(module, table)}.{param}"


# --- state dicts ----------------------------------------------------------------------------


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state dict -> `model.diffusion_model.*` keys (shapes unchanged)."""
    table = unet_module_table(config)
    return {UNET_PREFIX + _map_key(k, table): v for k, v in state_dict.items()}


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict -> `first_stage_model.*`; attention weights become 1x1 convs."""
    table = vae_module_table(config)
    out = {}
    for key, value in state_dict.items():
        new = _map_key(key, table)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)  # (C, C) -> (C, C, 1, 1)
        out[VAE_PREFIX + new] = value
    return out


def _clip_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 drops the `text_model.` level of CLIPTextModel; accept both spellings."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor],
                prefix: str = SD1_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """CLIPTextModel -> `<prefix>text_model.*` (names unchanged): SD 1.x's text encoder, or
    SDXL's first with prefix SDXL_CLIP_PREFIX."""
    return {f"{prefix}text_model.{k}": v for k, v in _clip_names(state_dict).items()}


def _open_clip_tower(sd: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """CLIPTextModel names (without `text_model.`) -> OpenCLIP's text tower, q/k/v fused."""
    table = open_clip_module_table(num_layers)
    out: dict[str, torch.Tensor] = {}
    fused = {"q_proj", "k_proj", "v_proj"}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module.rpartition(".")[2] in fused:
            continue
        if key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        else:
            out[_map_key(key, table)] = value
    for i in range(num_layers):
        for param in ("weight", "bias"):
            parts = [
                sd[f"encoder.layers.{i}.self_attn.{p}.{param}"]
                for p in ("q_proj", "k_proj", "v_proj")
            ]
            out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(parts)  # (3D, ...)
    return out


def open_clip_g_to_ldm(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder (CLIPTextModelWithProjection, all its layers: SDXL takes the
    penultimate hidden state itself) -> `conditioner.embedders.1.model.*`. OpenCLIP applies the
    projection as `x @ text_projection`, so the file holds the transposed Linear weight."""
    sd = dict(_clip_names(state_dict))
    projection = sd.pop("text_projection.weight")  # (projection_dim, width)
    out = _open_clip_tower(sd, num_layers)
    out["text_projection"] = projection.T.contiguous()  # (width, projection_dim)
    out["logit_scale"] = torch.tensor(LOGIT_SCALE, dtype=projection.dtype, device=projection.device)
    return {SDXL_OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def open_clip_to_ldm(
    state_dict: Mapping[str, torch.Tensor], num_layers: int
) -> dict[str, torch.Tensor]:
    """SD 2.x text encoder (a CLIPTextModel without the unused last layer) -> OpenCLIP keys.

    diffusers keeps `num_layers` layers (23 for SD 2.x) because SD 2 conditions on the
    penultimate layer of OpenCLIP's 24. A real checkpoint holds all 24, so like sd-scripts we
    write the unused last block as a copy of the one before it, plus an identity
    `text_projection` and a `logit_scale`; no SD 2 loader reads those, but every one expects them.
    """
    sd = _clip_names(state_dict)
    out = _open_clip_tower(sd, num_layers)
    last = f"transformer.resblocks.{num_layers - 1}."
    for key in [k for k in out if k.startswith(last)]:
        out[key.replace(last, f"transformer.resblocks.{num_layers}.")] = out[key].clone()
    width = out["positional_embedding"].shape[1]
    ref = out["positional_embedding"]
    out["text_projection"] = torch.eye(width, dtype=ref.dtype, device=ref.device)
    out["logit_scale"] = torch.tensor(1.0, dtype=ref.dtype, device=ref.device)
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def components_to_ldm(unet, vae, text_encoder, family: str,
                      text_encoder_2=None) -> dict[str, torch.Tensor]:
    """One LDM state dict from the models of an SD 1.x (`sd1`), SD 2.x (`sd2`) or SDXL (`sdxl`,
    with `text_encoder_2`) pipeline."""
    out = unet_to_ldm(unet.state_dict(), unet.config)
    out.update(vae_to_ldm(vae.state_dict(), vae.config))
    if family == "sd1":
        out.update(clip_to_ldm(text_encoder.state_dict()))
    elif family == "sd2":
        out.update(
            open_clip_to_ldm(text_encoder.state_dict(), text_encoder.config.num_hidden_layers)
        )
    elif family == "sdxl":
        if text_encoder_2 is None:
            raise UserError("an SDXL checkpoint needs both text encoders")
        out.update(clip_to_ldm(text_encoder.state_dict(), SDXL_CLIP_PREFIX))
        out.update(open_clip_g_to_ldm(text_encoder_2.state_dict(),
                                      text_encoder_2.config.num_hidden_layers))
    else:
        raise UserError(f"single-file LDM export supports sd1, sd2 and sdxl, not {family!r}")
    return out
