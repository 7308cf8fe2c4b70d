"""SD3 / SD3.5 transformer module names: diffusers' `SD3Transformer2DModel` <-> the original MMDiT.

sd-scripts trains, and ComfyUI reads, SD3 LoRA over the original MMDiT module names
(`joint_blocks.0.x_block.attn.qkv`); diffusers names the same layers its own way
(`transformer_blocks.0.attn.to_q`). The authority for the correspondence is diffusers' converter
`convert_sd3_transformer_checkpoint_to_diffusers`; `tests/test_sd3_formats.py` runs it on a state
dict renamed by these tables and gets the diffusers one back, tensor for tensor.

Two things are more than renames:
- q, k and v are one Linear `qkv` in the original (output rows: q, then k, then v). A LoRA on the
  three is one LoRA on `qkv`: `fuse_qkv` / `split_qkv`, both exact.
- The converter swaps the two halves of the rows (shift, scale -> scale, shift) of every
  `AdaLayerNormContinuous` linear: `norm_out.linear` and the last block's `norm1_context.linear`
  (that block's context stream is "pre-only", so its norm is the 2-chunk continuous one rather than
  the 6-chunk `AdaLayerNormZero`). A LoRA's rows follow: `lora_B` is swapped the same way.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from sd_lora.formats.adapter_state import LoraModule, delta_shape


class MmditKeyError(ValueError):
    """A module path with no counterpart in the other naming; the message names the path."""


# Per block: diffusers `transformer_blocks.N.<key>` <-> original `joint_blocks.N.<value>`.
BLOCK_MODULES: dict[str, str] = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",  # SD3.5 Medium's MMDiT-X blocks
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    # The q/k RMS norms (qk_norm): never adapted, named so that whole checkpoints convert too.
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
}
# Per block: the original fused layer and the three diffusers layers it holds, in row order.
QKV_PARTS: dict[str, tuple[str, str, str]] = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
# Outside the blocks: embedders and the final layer.
TOP_MODULES: dict[str, str] = {
    "pos_embed.proj": "x_embedder.proj",  # Conv2d, the patch embedding
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# Diffusers layers whose rows the converter swaps when they are AdaLayerNormContinuous (see top);
# N stands for any block number.
SCALE_SHIFT_LAYERS = ("norm_out.linear", "transformer_blocks.N.norm1_context.linear")

_BLOCK_INVERSE = {v: k for k, v in BLOCK_MODULES.items()}
_TOP_INVERSE = {v: k for k, v in TOP_MODULES.items()}
_PART_OF = {part: (fused, i) for fused, parts in QKV_PARTS.items() for i, part in enumerate(parts)}
_DIFFUSERS_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_ORIGINAL_BLOCK = re.compile(r"joint_blocks\.(\d+)\.(.+)")
# First path components only the original naming uses (context_embedder is the same in both).
ORIGINAL_ROOTS = ({"joint_blocks"} | {v.split(".")[0] for v in TOP_MODULES.values()}) - {
    k.split(".")[0] for k in TOP_MODULES}


class OriginalName(NamedTuple):
    path: str  # original MMDiT module path, e.g. joint_blocks.0.x_block.attn.qkv
    part: int | None  # 0, 1, 2 for q, k, v inside a fused qkv; None for a whole layer


def original_name(path: str) -> OriginalName:
    """The original MMDiT module holding diffusers module `path`."""
    if path in TOP_MODULES:
        return OriginalName(TOP_MODULES[path], None)
    match = _DIFFUSERS_BLOCK.fullmatch(path)
    if match:
        block, rest = match.groups()
        if rest in BLOCK_MODULES:
            return OriginalName(f"joint_blocks.{block}.{BLOCK_MODULES[rest]}", None)
        if rest in _PART_OF:
            fused, part = _PART_OF[rest]
            return OriginalName(f"joint_blocks.{block}.{fused}", part)
    raise MmditKeyError(
        f"SD3 transformer module {path!r} has no original MMDiT name; known: "
        f"{sorted(TOP_MODULES)} and transformer_blocks.N.{{{', '.join(sorted([*BLOCK_MODULES, *_PART_OF]))}}}"
    )


def diffusers_paths(original: str) -> tuple[str, ...]:
    """The diffusers module paths of original module `original`: three (q, k, v) for a qkv."""
    if original in _TOP_INVERSE:
        return (_TOP_INVERSE[original],)
    match = _ORIGINAL_BLOCK.fullmatch(original)
    if match:
        block, rest = match.groups()
        if rest in _BLOCK_INVERSE:
            return (f"transformer_blocks.{block}.{_BLOCK_INVERSE[rest]}",)
        if rest in QKV_PARTS:
            return tuple(f"transformer_blocks.{block}.{part}" for part in QKV_PARTS[rest])
    raise MmditKeyError(
        f"original MMDiT module {original!r} has no diffusers SD3 name; known: "
        f"{sorted(_TOP_INVERSE)} and joint_blocks.N.{{{', '.join(sorted([*_BLOCK_INVERSE, *QKV_PARTS]))}}}"
    )


def is_original(path: str) -> bool:
    """Whether `path` is spelled in the original naming (context_embedder: both, the same)."""
    return path.split(".")[0] in ORIGINAL_ROOTS


def swaps_scale_shift(path: str, out_features: int, in_features: int) -> bool:
    """Whether the converter swaps the row halves of diffusers layer `path` (out x in): only the
    AdaLayerNormContinuous linears, which map dim to 2 * dim (AdaLayerNormZero: 6 or 9 * dim), so
    the shape tells the last block's `norm1_context.linear` from the others without a model."""
    return _scale_shift_layer(path) and out_features == 2 * in_features


def _scale_shift_layer(path: str) -> bool:
    return re.sub(r"^transformer_blocks\.\d+\.", "transformer_blocks.N.", path) in SCALE_SHIFT_LAYERS


def swap_scale_shift(rows: torch.Tensor) -> torch.Tensor:
    """The two halves of dim 0 exchanged, as the converter does; its own inverse."""
    first, second = rows.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fuse_qkv(q: LoraModule, k: LoraModule, v: LoraModule) -> LoraModule:
    """One LoRA on the fused qkv layer whose delta is the three deltas stacked by rows:
    down = cat of the downs (rq+rk+rv, in), up = block diagonal (3 * out, rq+rk+rv). Its scale is
    q's; k's and v's scale ratios to it are folded into their up blocks (none when equal)."""
    parts = (q, k, v)
    shapes = {(m.lora_A.dim(), m.lora_A.shape[1], m.lora_B.shape[0]) for m in parts}
    if len(shapes) != 1 or next(iter(shapes))[0] != 2:
        raise MmditKeyError(f"q, k and v must be Linear LoRA of one in and out size to fuse; "
                            f"got (dims, in, out) {sorted(shapes)}")
    rank = sum(m.r for m in parts)
    scale = q.scale
    ups = [m.lora_B if m.scale == scale else m.lora_B * (m.scale / scale) for m in parts]
    # alpha * (rank / r) rather than scale * rank: equal ranks give exactly 3 * alpha.
    return LoraModule(lora_A=torch.cat([m.lora_A for m in parts]), lora_B=torch.block_diag(*ups),
                      alpha=float(q.alpha) * (rank / q.r))


def split_qkv(fused: LoraModule) -> tuple[LoraModule, LoraModule, LoraModule]:
    """q, k and v LoRA whose deltas are the fused delta's three row blocks; exact for any fused
    LoRA. A block-diagonal up of rank 3r (what `fuse_qkv` and sd-scripts' split_qkv write) gives
    three rank-r modules; otherwise (sd-scripts' default, one shared down) each keeps the whole
    down and its rows of up. Tensors are copies: a file cannot hold views of one storage."""
    out3, rank = fused.lora_B.shape[0], fused.r
    if fused.lora_A.dim() != 2 or out3 % 3:
        raise MmditKeyError(f"a fused qkv LoRA needs a Linear up with 3 * out rows; got up "
                            f"{tuple(fused.lora_B.shape)}, down {tuple(fused.lora_A.shape)}")
    ups = fused.lora_B.chunk(3, dim=0)
    r = rank // 3
    if rank % 3 == 0 and all(_only_block(up, i, r) for i, up in enumerate(ups)):
        return tuple(LoraModule(fused.lora_A[i * r:(i + 1) * r].clone(),
                                ups[i][:, i * r:(i + 1) * r].clone(), fused.alpha / 3)
                     for i in range(3))
    return tuple(LoraModule(fused.lora_A.clone(), up.clone(), fused.alpha) for up in ups)


def _only_block(up: torch.Tensor, i: int, r: int) -> bool:
    """Whether `up` (out, 3r) is zero outside its columns i*r .. (i+1)*r."""
    outside = torch.cat([up[:, : i * r], up[:, (i + 1) * r:]], dim=1)
    return not bool(outside.any())


def to_original_modules(modules: dict) -> dict:
    """{diffusers path: module} -> {original path: module}: q/k/v fused (all three needed),
    AdaLayerNormContinuous rows swapped. Raises MmditKeyError naming what cannot be written."""
    written: dict = {}
    fused: dict[str, dict[int, object]] = {}
    for path, module in modules.items():
        name = original_name(path)
        if name.part is None:
            written[name.path] = _swapped(path, module)
        else:
            written.setdefault(name.path, None)  # keep the fused layer where its first part was
            fused.setdefault(name.path, {})[name.part] = module
    for original, parts in fused.items():
        written[original] = _fused(original, parts)
    return written


def _fused(original: str, parts: dict[int, object]) -> LoraModule:
    paths = diffusers_paths(original)
    missing = [paths[i] for i in range(3) if i not in parts]
    if missing:
        raise MmditKeyError(
            f"the original MMDiT holds {', '.join(paths)} in one layer {original!r}, so a LoRA "
            f"there needs all three; missing {missing}: adapt q, k and v together (the 'attn' "
            f"target group does) or save in the diffusers layout"
        )
    kinds = {parts[i].kind for i in range(3)}
    if kinds != {"lora"}:
        raise MmditKeyError(f"{original}: only plain LoRA q/k/v fuse exactly into one layer; "
                            f"these are {sorted(kinds)}: save in the diffusers layout")
    return fuse_qkv(*(parts[i] for i in range(3)))


def from_original_module(original: str, module) -> dict:
    """{diffusers path: module} for one module read under original name `original`: a fused qkv
    split into q, k, v; AdaLayerNormContinuous rows swapped back."""
    paths = diffusers_paths(original)
    if len(paths) == 1:
        return {paths[0]: _swapped(paths[0], module)}
    if module.kind != "lora":
        raise MmditKeyError(f"{original}: a fused qkv {module.kind} module cannot be split into "
                            f"q, k and v exactly; only plain LoRA can")
    return dict(zip(paths, split_qkv(module)))


def _swapped(path: str, module):
    """`module` with its up rows swapped when the converter swaps the layer's rows."""
    if not _scale_shift_layer(path):
        return module
    shape = ((module.lora_B.shape[0], *module.lora_A.shape[1:]) if module.kind == "lora"
             else tuple(delta_shape(module)))
    if len(shape) != 2 or not swaps_scale_shift(path, shape[0], shape[1]):
        return module
    if module.kind != "lora":
        raise MmditKeyError(f"{path}: the two namings order this layer's rows differently; only "
                            f"a plain LoRA module can follow, not {module.kind}")
    return LoraModule(module.lora_A, swap_scale_shift(module.lora_B), module.alpha)
