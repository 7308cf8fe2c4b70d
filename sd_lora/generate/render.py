"""Render images from a pipeline, lay them out in grids, and label PNGs the way A1111 does.

Latents are decoded here rather than inside the pipeline so that the VAE may keep its own dtype
(fp32 beside an fp16 UNet) without a dtype clash.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, PngImagePlugin

from sd_lora.models.families import denoiser_of
from sd_lora.models.vae import unscale_latents
from sd_lora.util.atomic import atomic_path


@dataclass(frozen=True)
class RenderSettings:
    prompt: str
    seed: int
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler: str = "Euler"  # the A1111 name of the pipeline's scheduler, for the PNG text
    extra: dict[str, str] = field(default_factory=dict)  # more `Key: value` pairs for the PNG


@torch.no_grad()
def render(pipe, settings: RenderSettings) -> Image.Image:
    """One image; the same settings and weights always give the same pixels on one device."""
    denoiser_param = next(denoiser_of(pipe).parameters())
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    factor = pipe.vae_scale_factor  # 8 for SD's VAE, 4 for the toy base's
    with seeded_global_rng(settings.seed, denoiser_param.device):
        latents = pipe(
            prompt=settings.prompt,
            negative_prompt=settings.negative_prompt or None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            width=settings.width,
            height=settings.height,
            generator=generator,
            latents=torch.randn(
                (1, denoiser_of(pipe).config.in_channels, settings.height // factor,
                 settings.width // factor),
                generator=generator,
            ).to(denoiser_param.device, denoiser_param.dtype),
            output_type="latent",
        ).images
    return decode_latents(pipe.vae, latents)


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNGs seeded with `seed`, and restored after: a pipeline that draws noise
    without our generator (SD3's passes none to its scheduler, so its ancestral Euler draws
    from the global RNG) still gives the same pixels for the same seed."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> Image.Image:
    vae_param = next(vae.parameters())
    scaled = unscale_latents(vae, latents.to(vae_param.device, vae_param.dtype))
    image = vae.decode(scaled).sample[0].float().clamp(-1, 1)  # (3, H, W)
    array = ((image + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def image_grid(images: list[Image.Image], columns: int, labels: list[str] | None = None,
               min_cell: int = 128) -> Image.Image:
    """Images in rows of `columns`, each with an optional caption underneath.

    Small images (the tiny base renders 64 px) are enlarged without smoothing so they stay
    legible; captions wrap onto at most two lines.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    scale = max(1, -(-min_cell // w))  # ceil(min_cell / w)
    cw, ch = w * scale, h * scale
    chars = max(4, cw // 6)
    strip = 26 if labels else 0
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cw, rows * (ch + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % columns) * cw, (i // columns) * (ch + strip)
        grid.paste(image.resize((cw, ch), Image.NEAREST), (x, y))
        if labels:
            text = textwrap.wrap(labels[i], chars)[:2]
            draw.multiline_text((x + 2, y + ch + 1), "\n".join(text), fill="black", spacing=1)
    return grid


def a1111_parameters(settings: RenderSettings) -> str:
    """The `parameters` text A1111 writes into PNGs (and reads back with 'PNG Info')."""
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    pairs = {
        "Steps": str(settings.steps),
        "Sampler": settings.sampler,
        "CFG scale": f"{settings.guidance_scale:g}",
        "Seed": str(settings.seed),
        "Size": f"{settings.width}x{settings.height}",
        **settings.extra,
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items()))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, parameters: str | None = None) -> Path:
    """Write a PNG atomically, with the A1111 `parameters` text chunk when given."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
