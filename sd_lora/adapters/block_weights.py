"""LoRA Block Weight (LBW): a strength per UNet block, as the A1111 extension
`sd-webui-lora-block-weight` defines it for SD 1.x / 2.x.

The 17 weights are `BASE` (the text encoder), then the UNet blocks that hold transformer
(attention) layers, in the LDM numbering A1111 users know:

    BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03 ... OUT11

26 weights name every block (adding IN00, IN03, IN06, IN09-IN11, OUT00-OUT02: the convolution-only
blocks that LoCon-style files adapt). As in the extension, 17 weights give those extra blocks
weight 0, and a module that belongs to no block (time embedding, final norm and conv) keeps
weight 1; `block_of` calls that place "OTHER".

diffusers names map to LDM blocks by position: `down_blocks.b.{attentions,resnets}.i` is
input block 3b+1+i and `down_blocks.b.downsamplers.0` is 3b+3; `up_blocks.b.*.i` is output block
3b+i and its upsampler sits in output block 3b+2; `mid_block` is MID; `conv_in` is IN00.
"""

from __future__ import annotations

import math
import re

from sd_lora.errors import UserError
from sd_lora.util.words import plural

BLOCK_NAMES = (
    "BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
)  # fmt: skip
ALL_BLOCK_NAMES = (  # the extension's 26-weight form
    ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("MID",)
    + tuple(f"OUT{i:02d}" for i in range(12))
)  # fmt: skip
OTHER = "OTHER"  # modules outside every block: always weight 1, as in the extension
# The extension's default presets (scripts/lbwpresets.txt), 17 weights each.
PRESETS: dict[str, tuple[float, ...]] = {
    name: tuple(float(v) for v in values.split(","))
    for name, values in {
        "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
        "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
        "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
        "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
        "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
        "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
        "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
        "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
        "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
        "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    }.items()
}
_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
_DOWN = re.compile(r"^down_blocks\.(\d+)\.(attentions|resnets|downsamplers)\.(\d+)(\.|$)")
_UP = re.compile(r"^up_blocks\.(\d+)\.(attentions|resnets|upsamplers)\.(\d+)(\.|$)")
_OUTSIDE = ("time_embedding.", "conv_out", "conv_norm_out", "add_embedding.")


class BlockWeightError(UserError):
    """Block weights that cannot be read or applied; the message names the value."""


def parse_block_weights(text: str) -> tuple[float, ...]:
    """A preset name (`INS`, ...) or 17 (or 26) comma-separated numbers -> the weights."""
    cleaned = (text or "").strip()
    if not cleaned:
        raise BlockWeightError(
            f"block weights are empty; give a preset ({', '.join(PRESETS)}) or "
            f"{len(BLOCK_NAMES)} comma-separated numbers ({','.join(BLOCK_NAMES)})"
        )
    if cleaned.upper() in PRESETS:
        return PRESETS[cleaned.upper()]
    tokens = [t.strip() for t in cleaned.split(",")]
    if len(tokens) == 1:
        raise BlockWeightError(
            f"block weights {cleaned!r}: not a preset; known presets: {', '.join(PRESETS)}"
        )
    if len(tokens) not in (len(BLOCK_NAMES), len(ALL_BLOCK_NAMES)):
        raise BlockWeightError(
            f"block weights {cleaned!r} has {plural(len(tokens), 'value')}; give {len(BLOCK_NAMES)} "
            f"({','.join(BLOCK_NAMES)}) or {len(ALL_BLOCK_NAMES)} (every block, IN00...OUT11)"
        )
    names = BLOCK_NAMES if len(tokens) == len(BLOCK_NAMES) else ALL_BLOCK_NAMES
    weights = []
    for name, token in zip(names, tokens):
        try:
            value = float(token)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise BlockWeightError(
                f"block weights: {name} = {token!r} is not a number (in {cleaned!r})"
            )
        weights.append(value)
    return tuple(weights)


def block_of(component: str, module_path: str) -> str:
    """The LBW block of a module: "BASE" for text encoders, "IN04", "MID", "OUT11", ... or
    OTHER for UNet modules outside every block (time embedding, final norm/conv)."""
    if component in _TEXT_COMPONENTS:
        return "BASE"
    if component != "unet":
        raise BlockWeightError(f"no LBW block for component {component!r}")
    if module_path.startswith("conv_in"):
        return "IN00"
    if module_path.startswith("mid_block."):
        return "MID"
    if module_path.startswith(_OUTSIDE):
        return OTHER
    down, up = _DOWN.match(module_path), _UP.match(module_path)
    if down:
        block, kind, index = int(down[1]), down[2], int(down[3])
        number = 3 * block + (3 if kind == "downsamplers" else 1 + index)
        return f"IN{number:02d}"
    if up:
        block, kind, index = int(up[1]), up[2], int(up[3])
        number = 3 * block + (2 if kind == "upsamplers" else index)
        return f"OUT{number:02d}"
    raise BlockWeightError(
        f"unet module {module_path!r} is in no SD 1.x/2.x UNet block; block weights need the "
        "diffusers module names of an SD 1.x/2.x UNet"
    )


def block_weight(weights: tuple[float, ...], component: str, module_path: str) -> float:
    """The multiplier `weights` (17 or 26 values) give this module."""
    block = block_of(component, module_path)
    if block == OTHER:
        return 1.0
    names = BLOCK_NAMES if len(weights) == len(BLOCK_NAMES) else ALL_BLOCK_NAMES
    if len(weights) != len(names):
        raise BlockWeightError(
            f"{len(weights)} block weights; expected {len(BLOCK_NAMES)} or {len(ALL_BLOCK_NAMES)}"
        )
    if block not in names:  # a 26-only block under 17 weights: the extension gives it 0
        return 0.0
    return float(weights[names.index(block)])


def format_block_weights(weights: tuple[float, ...]) -> str:
    """The preset name when `weights` equal one, else the comma-separated numbers."""
    for name, preset in PRESETS.items():
        if tuple(weights) == preset:
            return name
    return ",".join(f"{w:g}" for w in weights)
