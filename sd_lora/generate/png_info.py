"""Read the A1111 `parameters` text back from a PNG ("PNG Info"), the inverse of
`sd_lora.generate.render.a1111_parameters` with the `<lora:...>` tags of `sd_lora.generate.images.lora_tag`.

The text is

    <prompt, any number of lines, with <lora:name:weight> tags>
    Negative prompt: <negative prompt, any number of lines>
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Model: tiny, ...

and is parsed the way A1111's `parse_generation_parameters` does: the last line holds the
`Key: value` pairs when it has at least three; quoted values are JSON strings. Lora tags follow
A1111's extra-network syntax: `<lora:name>` (strength 1), `<lora:name:w>` (both),
`<lora:name:te:unet>`, named `te=`/`unet=`, and the block-weight extension's `lbw=`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sd_lora.errors import UserError

# A1111's modules/infotext_utils.py patterns.
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
LORA_TAG = re.compile(r"<lora:([^>]*)>")
LORA_CLEANUP = re.compile(r"[ \t]*<lora:[^>]*>")  # a tag and the spaces before it
REQUIRED = ("Steps", "Sampler", "CFG scale", "Seed", "Size")


class PngInfoError(UserError):
    """Parameters text that cannot be read; the message names the file or field."""


@dataclass(frozen=True)
class ParsedParameters:
    prompt: str  # without the <lora:...> tags
    negative_prompt: str
    steps: int
    sampler: str
    guidance: float
    seed: int
    width: int
    height: int
    model: str | None
    loras: list[tuple[str, float, float]]  # (name, te, unet), in prompt order
    lora_blocks: dict[str, str] = field(default_factory=dict)  # name -> lbw= text, when given
    extra: dict[str, str] = field(default_factory=dict)  # every other `Key: value` pair


def parse_parameters(text: str, source: str = "parameters") -> ParsedParameters:
    """Parse A1111 `parameters` text; errors name `source` and the field."""
    if not text or not text.strip():
        raise PngInfoError(f"{source}: the parameters text is empty")
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative = _split_prompts(lines)
    pairs = _pairs(last, source)
    missing = [key for key in REQUIRED if key not in pairs]
    if missing:
        raise PngInfoError(
            f"{source}: no {', '.join(missing)} in the parameters line {last!r}; this is not "
            "A1111-style generation text"
        )
    loras, blocks = _lora_tags(prompt, source)
    size = IMAGE_SIZE.match(pairs["Size"])
    if size is None:
        raise PngInfoError(f"{source}: Size {pairs['Size']!r} is not WIDTHxHEIGHT")
    known = set(REQUIRED) | {"Model", "Schedule type"}
    return ParsedParameters(
        prompt=LORA_CLEANUP.sub("", prompt).strip(),
        negative_prompt=negative,
        steps=_number(pairs, "Steps", int, source),
        sampler=_sampler(pairs),
        guidance=_number(pairs, "CFG scale", float, source),
        seed=_number(pairs, "Seed", int, source),
        width=int(size[1]),
        height=int(size[2]),
        model=pairs.get("Model"),
        loras=loras,
        lora_blocks=blocks,
        extra={k: v for k, v in pairs.items() if k not in known},
    )


def _split_prompts(lines: list[str]) -> tuple[str, str]:
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative)


def _pairs(line: str, source: str) -> dict[str, str]:
    pairs = {}
    for key, value in PARAM.findall(line):
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise PngInfoError(f"{source}: {key} has a badly quoted value {value!r}") from e
        pairs[key.strip()] = value.strip()
    return pairs


def _number(pairs: dict[str, str], key: str, kind: type, source: str):
    try:
        value = kind(pairs[key])
    except ValueError:
        raise PngInfoError(f"{source}: {key} = {pairs[key]!r} is not a number") from None
    if kind is float and not math.isfinite(value):
        raise PngInfoError(f"{source}: {key} = {pairs[key]!r} is not a finite number")
    return value


def _sampler(pairs: dict[str, str]) -> str:
    """A1111 1.6+ writes the Karras schedule apart: `Sampler: DPM++ 2M, Schedule type: Karras`."""
    sampler = pairs["Sampler"]
    schedule = pairs.get("Schedule type", "")
    if schedule.lower() == "karras" and not sampler.endswith("Karras"):
        return f"{sampler} Karras"
    return sampler


def _lora_tags(prompt: str, source: str) -> tuple[list[tuple[str, float, float]], dict[str, str]]:
    loras: list[tuple[str, float, float]] = []
    blocks: dict[str, str] = {}
    for body in LORA_TAG.findall(prompt):
        name, te, unet, lbw = parse_lora_tag(body, source)
        loras.append((name, te, unet))
        if lbw is not None:
            blocks[name] = lbw
    return loras, blocks


def parse_lora_tag(body: str, source: str = "prompt") -> tuple[str, float, float, str | None]:
    """The inside of `<lora:...>` -> (name, te, unet, lbw text or None), A1111's rules:
    positional te then unet (unet defaults to te, te to 1), or named `te=`, `unet=`, `lbw=`."""
    name, *items = body.split(":")
    if not name.strip():
        raise PngInfoError(f"{source}: <lora:{body}> has no adapter name")
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if eq:
            if key not in ("te", "unet", "lbw"):
                raise PngInfoError(
                    f"{source}: <lora:{body}> has argument {key!r}; sd-lora reads te=, unet= "
                    "and lbw= (block weights)"
                )
            named[key] = value
        else:
            positional.append(item)
    if len(positional) > 2:
        raise PngInfoError(f"{source}: <lora:{body}> has {len(positional)} numbers; at most te:unet")
    te_text = named.get("te", positional[0] if positional else "1")
    unet_text = named.get("unet", positional[1] if len(positional) > 1 else te_text)
    try:
        te, unet = float(te_text), float(unet_text)
    except ValueError:
        raise PngInfoError(f"{source}: <lora:{body}>: strengths must be numbers") from None
    return name.strip(), te, unet, named.get("lbw")


def format_lora_tag(name: str, te: float, unet: float, blocks: str | None = None) -> str:
    """A1111's tag for these strengths (one weight when they are equal), with `lbw=` when block
    weights are set."""
    weights = f"{unet:g}" if te == unet else f"{te:g}:{unet:g}"
    lbw = f":lbw={blocks}" if blocks else ""
    return f"<lora:{name}:{weights}{lbw}>"


def read_png_parameters(path: str | os.PathLike) -> ParsedParameters:
    """The parameters a PNG (or any image with a `parameters` text) carries; errors name it."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            text = image.info.get("parameters")
    except (FileNotFoundError, IsADirectoryError):
        raise PngInfoError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise PngInfoError(f"{path}: not a readable image ({e})") from e
    if not isinstance(text, str) or not text.strip():
        raise PngInfoError(
            f"{path}: the image carries no 'parameters' text (it was not saved by A1111 or "
            "sd-lora, or a program stripped its metadata)"
        )
    return parse_parameters(text, source=str(path))
