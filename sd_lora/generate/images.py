"""Base + adapters with weights -> images with their parameters in the PNG (A1111 style)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sd_lora.adapters.run_folder import not_an_adapter
from sd_lora.adapters.use import AdapterUse
from sd_lora.errors import UserError
from sd_lora.generate.png_info import format_lora_tag, parse_lora_tag
from sd_lora.generate.render import RenderSettings, a1111_parameters, render, save_png


def parse_adapter_choice(text: str) -> AdapterUse[Path]:
    """'FILE', 'FILE:W' (both strengths) or 'FILE:TE:UNET' (A1111's positional order), as an
    `AdapterUse` of the file, named by its stem.

    Numbers are taken from the right, so paths that contain ':' still work.
    """
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = Path(":".join(parts))
    if not numbers:
        return AdapterUse(path, name=path.stem)
    if len(numbers) == 1:
        return AdapterUse(path, numbers[0], numbers[0], name=path.stem)
    return AdapterUse(path, unet=numbers[1], text_encoder=numbers[0], name=path.stem)


LORA_FORMS = ("FILE, FILE:W, FILE:TE:UNET (A1111's te/unet order), or A1111's <lora:NAME:W> / "
              "<lora:NAME:TE:UNET> for NAME.safetensors")
SUFFIX = ".safetensors"


def resolve_adapter_choice(text: str, flag: str = "--lora") -> AdapterUse[Path]:
    """`parse_adapter_choice`, or A1111's `<lora:...>` tag, for a file that must exist: a name
    without its suffix is read as NAME.safetensors when that is there (a tag's name always is),
    relative to the current folder. A file missing, or one of a training checkpoint, is refused with what to give."""
    tag = text.strip()
    if tag.startswith("<lora:") and tag.endswith(">"):
        choice = _tag_choice(tag, flag)
    else:
        choice = parse_adapter_choice(text)
    named = _with_suffix(choice.adapter)
    if not choice.adapter.exists() and named.is_file():  # "demo:0.8" for demo.safetensors
        choice = replace(choice, adapter=named, name=named.stem)
    if (problem := not_an_adapter(choice.adapter)) is not None:
        raise UserError(f"{flag} {text}: {problem}")
    if not choice.adapter.is_file():
        raise UserError(f"{flag} {text}: {_not_found(text, choice.adapter)}; the accepted forms are "
                        f"{LORA_FORMS}")
    return choice


def _tag_choice(tag: str, flag: str) -> AdapterUse[Path]:
    name, te, unet, blocks = parse_lora_tag(tag[len("<lora:"):-1], f"{flag} {tag}")
    if blocks is not None:
        raise UserError(f"{flag} {tag}: lbw= (block weights) is an app setting; leave it out here")
    path = _with_suffix(Path(name))
    return AdapterUse(path, unet=unet, text_encoder=te, name=path.stem)


def _with_suffix(path: Path) -> Path:
    return path if path.name.lower().endswith(SUFFIX) else path.with_name(path.name + SUFFIX)


def _not_found(text: str, path: Path) -> str:
    """'no such file' and, for the usual slips, what was probably meant."""
    if path.is_dir():
        return f"{path} is a folder; name the adapter file in it"
    found = f"no file {path}" + ("" if path.is_absolute() else " (from the current folder)")
    if "=" in text or "," in text:  # file.safetensors=0.8, file.safetensors:0,8
        return found + " (a strength follows ':' and uses '.' for decimals, e.g. FILE:0.8)"
    return found


def lora_tag(choice: AdapterUse) -> str:
    """The prompt tag A1111 uses to reproduce this choice."""
    return format_lora_tag(choice.name, choice.text_encoder, choice.unet)


def generate_images(
    pipe,
    settings: RenderSettings,
    count: int,
    output: Path,
    adapters: list[AdapterUse],
    adapter_hashes: dict[str, str],
    model_name: str,
) -> list[Path]:
    """Render `count` images (seeds settings.seed, +1, ...) and save them with their parameters.

    The adapters must already be applied to `pipe`; they are recorded in the PNG text.
    """
    paths = []
    tags = " ".join(lora_tag(a) for a in adapters)
    for i in range(count):
        seeded = RenderSettings(**{**settings.__dict__, "seed": settings.seed + i})
        image = render(pipe, seeded)
        extra = {"Model": model_name, **settings.extra}
        if adapter_hashes:
            extra["Lora hashes"] = '"' + ", ".join(f"{n}: {h}" for n, h in adapter_hashes.items()) + '"'
        recorded = RenderSettings(**{**seeded.__dict__, "prompt": f"{settings.prompt} {tags}".strip(),
                                     "extra": extra})
        target = output if count == 1 else output.with_name(f"{output.stem}-{i:03d}{output.suffix}")
        paths.append(save_png(image, target, a1111_parameters(recorded)))
    return paths
