"""Base + adapters with weights -> images with their parameters in the PNG (A1111 style)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sd_lora.sampling import RenderSettings, a1111_parameters, render, save_png


@dataclass(frozen=True)
class AdapterChoice:
    """One `--lora` argument: a file and its strengths (A1111's te/unet multipliers)."""

    path: Path
    unet_strength: float = 1.0
    text_encoder_strength: float = 1.0

    @property
    def name(self) -> str:
        return self.path.stem


def parse_adapter_choice(text: str) -> AdapterChoice:
    """'FILE', 'FILE:W' (both strengths) or 'FILE:TE:UNET' (A1111's positional order).

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
        return AdapterChoice(path)
    if len(numbers) == 1:
        return AdapterChoice(path, numbers[0], numbers[0])
    return AdapterChoice(path, unet_strength=numbers[1], text_encoder_strength=numbers[0])


def lora_tag(choice: AdapterChoice) -> str:
    """The prompt tag A1111 uses to reproduce this choice."""
    if choice.unet_strength == choice.text_encoder_strength:
        return f"<lora:{choice.name}:{choice.unet_strength:g}>"
    return f"<lora:{choice.name}:{choice.text_encoder_strength:g}:{choice.unet_strength:g}>"


def generate_images(
    pipe,
    settings: RenderSettings,
    count: int,
    output: Path,
    adapters: list[AdapterChoice],
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
