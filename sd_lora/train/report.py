"""The quality report written after every training run: `report.json` and `report.png`.

What a person wants to know about a style adapter, measured rather than eyeballed:
- does it fit the style? The denoising loss on held-out images in the style, with the adapter at
  weight 0 (the base) and 1, on fixed timesteps and noise (`sd_lora.train.evaluate`);
- does it leak? The same on images NOT in the style, captioned without the trigger word;
- what does it look like? A grid of fixed prompts and seeds at adapter weights 0, 0.5 and 1 (a
  row without the trigger word shows leakage);
- where its caller gives a style scorer (the CLI and the app give the toy world's,
  `sd_lora.world.scorer.toy_style_scorer`), a style score of generations with and without the
  adapter, for prompts with the trigger word and without.

On a random-weight base (`tiny`) images are noise: the report renders nothing (no grid, style
score or off-style renders), measures the losses it can, and says so. Each step is told on the
console as it runs (`sd_lora.util.phases`); `sd_lora.train.report_plot` draws the figure.

The adapter's weight is set on the trained (PEFT) layers in place (`inject.lora_weight`), so
nothing is reloaded; tests check that these layers and the exported files give the same outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd_lora.config import JobConfig, ReportConfig
from sd_lora.data import DatasetScan, scan_dataset
from sd_lora.data.captions import detect_trigger, strip_trigger
from sd_lora.data.loader import centre_crop_batch
from sd_lora.generate.render import RenderSettings, image_grid, render
from sd_lora.lora.inject import lora_weight
from sd_lora.models.bases import RANDOM_BASES
from sd_lora.models.families import denoiser_of
from sd_lora.models.text import text_encoders_of, tokenizers_of
from sd_lora.train.evaluate import eval_chunks, eval_loss, make_eval_batch
from sd_lora.train.outputs import sample_prompts
from sd_lora.train.report_plot import plot_report
from sd_lora.util.atomic import atomic_path
from sd_lora.util.phases import phase
from sd_lora.util.processes import say
from sd_lora.util.words import plural

GENERATED_OFF_STYLE_IMAGES = 8  # renders of the base when no off-style folder is given
STYLE_SCORE_PROMPTS = 8


@dataclass(frozen=True)
class LossComparison:
    source: str  # where the images came from, in words
    images: int
    base: float  # adapter weight 0
    adapter: float  # adapter weight 1
    name: str = ""  # which set, short: "12 held-out images", "4 training images (no held-out set)"

    @property
    def change(self) -> float:
        """Relative change: -0.3 is a 30% lower loss with the adapter."""
        return (self.adapter - self.base) / self.base if self.base else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "change": round(self.change, 4)}


@dataclass(frozen=True)
class StyleScorer:
    """How to score a style in a generated image, given by the report's caller: the training
    code knows no style itself (the toy world, which does, sits above it)."""

    base: str  # the base whose renders it scores (report.style = "auto" applies only there)
    styles: Mapping[str, str]  # trigger word -> style name, for report.style = "auto"
    score: Callable[[Image.Image, str], float]  # 0: like the plain renders, 1: in the style


@dataclass(frozen=True)
class StyleScores:
    style: str
    prompts: int
    with_trigger: tuple[float, float]  # mean score at weight 0, weight 1
    without_trigger: tuple[float, float]

    def as_dict(self) -> dict:
        return {
            "style": self.style,
            "prompts": self.prompts,
            "with_trigger": {
                "base": self.with_trigger[0],
                "adapter": self.with_trigger[1],
                "rise": round(self.with_trigger[1] - self.with_trigger[0], 4),
            },
            "without_trigger": {
                "base": self.without_trigger[0],
                "adapter": self.without_trigger[1],
                "rise": round(self.without_trigger[1] - self.without_trigger[0], 4),
            },
        }


# --- captions ----------------------------------------------------------------------------------


# --- image sets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    pixels: torch.Tensor  # (n, 3, H, W) in [-1, 1]
    captions: list[str]
    source: str
    name: str  # the set, short, for the console and the figure


def folder_images(folder: str, resolution: int, limit: int, caption_extensions,
                  kind: str) -> ImageSet:
    """Up to `limit` captioned images of `folder`; `kind`: "held-out" or "off-style"."""
    scan = scan_dataset(Path(folder), caption_extensions=caption_extensions)
    samples = scan.samples[:limit]
    pixels, captions = centre_crop_batch(samples, resolution)
    return ImageSet(pixels, captions,
                    f"{plural(len(samples), 'image')} from {folder}",
                    plural(len(samples), f"{kind} image"))


def default_folders(data_path: str) -> dict[str, Path]:
    """Where an empty report.heldout / report.off_style looks (unless report.look_beside_data
    is false): heldout/<data folder name> and heldout/plain beside the data folder, the layout
    of datasets/toy/. The app checks these are inside its folders before anything looks."""
    heldout = Path(data_path).parent / "heldout"
    return {"heldout": heldout / Path(data_path).name, "off_style": heldout / "plain"}


def report_folder(cfg: ReportConfig, data_path: str, field: str) -> str:
    """report.<field>, else its default folder if that exists, else ""."""
    given = getattr(cfg, field)
    if given or not cfg.look_beside_data:
        return given
    candidate = default_folders(data_path)[field]
    return str(candidate) if candidate.is_dir() else ""


def heldout_folder(cfg: ReportConfig, data_path: str) -> str:
    return report_folder(cfg, data_path, "heldout")


def off_style_folder(cfg: ReportConfig, data_path: str) -> str:
    return report_folder(cfg, data_path, "off_style")


def heldout_images(
    folder: str, cfg: ReportConfig, scan: DatasetScan, resolution: int, caption_extensions
) -> ImageSet:
    if folder:
        return folder_images(folder, resolution, cfg.max_images, caption_extensions, "held-out")
    samples = scan.samples[: min(cfg.max_images, 4)]
    pixels, captions = centre_crop_batch(samples, resolution)
    count = plural(len(samples), "TRAINING image")
    return ImageSet(
        pixels,
        captions,
        f"{count} (no held-out set: set report.heldout, or put one in heldout/<name> beside "
        "the data folder)",
        f"{plural(len(samples), 'training image')} (no held-out set)",
    )


def pil_to_pixels(image: Image.Image) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


def off_style_prompts(cfg: ReportConfig, captions: list[str], trigger: str | None) -> list[str]:
    """What the base renders to stand in for an off-style folder: the training captions
    without the trigger word."""
    prompts = list(dict.fromkeys(strip_trigger(c, trigger) for c in captions))
    return prompts[: min(cfg.max_images, GENERATED_OFF_STYLE_IMAGES)]


def rendered_off_style(pipe, models, prompts: list[str], resolution: int, advance) -> ImageSet:
    images = []
    with lora_weight(models, 0.0):
        for i, p in enumerate(prompts):
            images.append(render(pipe, RenderSettings(prompt=p, seed=i, width=resolution,
                                                      height=resolution)))
            advance(1)
    count = plural(len(prompts), "render")
    return ImageSet(
        torch.stack([pil_to_pixels(im) for im in images]),
        prompts,
        f"{count} of the base for the training captions without the "
        "trigger word (no off-style folder: set report.off_style)",
        f"{count} of the base (no off-style set)",
    )


def compare_losses(pipe, schedule, models, images: ImageSet, advance=None) -> LossComparison:
    """The loss on `images` at adapter weight 0 and 1 (`advance`: called after each batch)."""
    batch = make_eval_batch(images.pixels, images.captions, pipe.vae, tokenizers_of(pipe))
    losses = []
    for weight in (0.0, 1.0):
        with lora_weight(models, weight):
            losses.append(eval_loss(denoiser_of(pipe), text_encoders_of(pipe), schedule, batch,
                                    advance=advance))
    return LossComparison(
        images.source, len(images.captions), round(losses[0], 6), round(losses[1], 6), images.name
    )


# --- generations -----------------------------------------------------------------------------


def render_at(
    pipe, models, weight: float, prompt: str, seed: int, config: JobConfig, resolution: int,
    advance=None,
) -> Image.Image:
    """One image at adapter weight `weight` (`advance`: called with 1 once it is rendered)."""
    sample = config.sample
    with lora_weight(models, weight):
        image = render(
            pipe,
            RenderSettings(
                prompt=prompt,
                seed=seed,
                steps=sample.steps,
                guidance_scale=sample.guidance_scale,
                negative_prompt=sample.negative_prompt,
                width=resolution,
                height=resolution,
            ),
        )
    if advance is not None:
        advance(1)
    return image


def grid_prompts(config: JobConfig, captions: list[str], trigger: str | None) -> list[str]:
    prompts = list(config.report.prompts) or sample_prompts(config.sample, captions)
    leak_row = strip_trigger(prompts[0], trigger)
    return prompts + [leak_row] if leak_row not in prompts else prompts


def before_after_images(
    pipe, models, config: JobConfig, prompts: list[str], resolution: int, advance=None
) -> list[list[Image.Image]]:
    """rows[prompt][weight], seed i for row i."""
    return [
        [render_at(pipe, models, w, p, i, config, resolution, advance)
         for w in config.report.weights]
        for i, p in enumerate(prompts)
    ]


def report_style(config: JobConfig, trigger: str | None, scorer: StyleScorer | None) -> str | None:
    """Which style to score, or None (no scorer, report.style = "none", or "auto" without a
    style the scorer knows by this trigger word on the base it was made for)."""
    chosen = config.report.style
    if chosen == "none" or scorer is None:
        return None
    if chosen != "auto":
        return chosen
    if config.model.base != scorer.base or trigger is None:
        return None
    return scorer.styles.get(trigger)


def style_scores(
    pipe,
    models,
    config: JobConfig,
    style: str,
    prompts: list[str],
    trigger: str | None,
    resolution: int,
    scorer: StyleScorer,
    advance=None,
) -> StyleScores:
    prompts = prompts[:STYLE_SCORE_PROMPTS]

    def mean_score(weight: float, texts: list[str]) -> float:
        scores = [
            scorer.score(render_at(pipe, models, weight, t, 100 + i, config, resolution, advance),
                         style)
            for i, t in enumerate(texts)
        ]
        return round(float(np.mean(scores)), 4)

    plain = [strip_trigger(p, trigger) for p in prompts]
    return StyleScores(
        style,
        len(prompts),
        (mean_score(0.0, prompts), mean_score(1.0, prompts)),
        (mean_score(0.0, plain), mean_score(1.0, plain)),
    )


# --- the report's steps -----------------------------------------------------------------------


def style_score_renders(prompts: int) -> int:
    """The images `style_scores` renders for `prompts` prompts: with and without the trigger
    word, at weights 0 and 1."""
    return 4 * min(prompts, STYLE_SCORE_PROMPTS)


def renders_skipped(base: str) -> str | None:
    """Why the report renders nothing for this base, or None when it renders."""
    if base in RANDOM_BASES:
        return (f"the base {base!r} has random weights (a test model), so its images are noise: "
                "no grid, style score or off-style renders")
    return None


@dataclass(frozen=True)
class Renders:
    """What the report rendered (nothing on a random base) or read as off-style images."""

    off_style: ImageSet | None  # the off-style folder's images, or renders standing in for it
    prompts: list[str]  # the grid's rows
    rows: list[list[Image.Image]]  # rows[prompt][weight]
    scores: StyleScores | None


def render_all(pipe, models, config: JobConfig, captions: list[str], heldout: ImageSet,
               trigger: str | None, resolution: int, bars: bool,
               scorer: StyleScorer | None) -> Renders:
    """Every image the report renders (the off-style stand-ins when no off-style folder is
    set, the grid, the style scores' generations), as one phase with a bar."""
    off_folder = off_style_folder(config.report, config.data.path)
    off_style = (folder_images(off_folder, resolution, config.report.max_images,
                               config.data.caption_extensions, "off-style")
                 if off_folder else None)
    if renders_skipped(config.model.base):
        return Renders(off_style, [], [], None)
    off_prompts = [] if off_folder else off_style_prompts(config.report, captions, trigger)
    prompts = grid_prompts(config, captions, trigger)
    style = report_style(config, trigger, scorer)
    total = (len(off_prompts) + len(prompts) * len(config.report.weights)
             + (style_score_renders(len(heldout.captions)) if style else 0))
    with phase("report", f"rendering {plural(total, 'image')}", total, bar=bars) as advance:
        if off_prompts:
            off_style = rendered_off_style(pipe, models, off_prompts, resolution, advance)
        rows = before_after_images(pipe, models, config, prompts, resolution, advance)
        scores = (style_scores(pipe, models, config, style, heldout.captions, trigger,
                               resolution, scorer, advance) if style else None)
    return Renders(off_style, prompts, rows, scores)


def measure_losses(pipe, schedule, models, heldout: ImageSet, off_style: ImageSet | None,
                   bars: bool) -> tuple[LossComparison, LossComparison | None]:
    """(the style loss, the off-style loss or None), as one phase with a bar over batches."""
    sets = [heldout] + ([off_style] if off_style is not None else [])
    chunks = 2 * sum(eval_chunks(len(s.captions)) for s in sets)
    doing = "loss at adapter weight 0 and 1 on " + " and ".join(s.name for s in sets)
    with phase("report", doing, chunks, unit="batch", bar=bars) as advance:
        losses = [compare_losses(pipe, schedule, models, s, advance) for s in sets]
    return losses[0], losses[1] if len(losses) > 1 else None


# --- writing -----------------------------------------------------------------------------------


def write_quality_report(
    pipe, models, schedule, config: JobConfig, scan: DatasetScan, resolution: int,
    output_dir: Path, bars: bool = True, scorer: StyleScorer | None = None,
) -> dict:
    """Measure, then write report.json, report.png and report_grid.png (no grid on a
    random-weight base, which renders nothing: report.json says why); returns the report.
    `bars`: progress bars (without them each phase still prints a line when it starts and
    ends)."""
    cfg = config.report
    models = list(models)
    captions = [s.caption for s in scan.samples]
    trigger = detect_trigger(captions)
    skipped = renders_skipped(config.model.base)
    if skipped:
        say(f"report: skipping the renders: {skipped}")
    heldout = heldout_images(heldout_folder(cfg, config.data.path), cfg, scan, resolution,
                             config.data.caption_extensions)
    renders = render_all(pipe, models, config, captions, heldout, trigger, resolution, bars,
                         scorer)
    style_loss, leak_loss = measure_losses(pipe, schedule, models, heldout, renders.off_style,
                                           bars)
    report = {
        "trigger_word": trigger,
        "heldout_style_loss": style_loss.as_dict(),  # its "name" says when it is not held out
        "off_style_loss": leak_loss.as_dict() if leak_loss else None,
        "style_score": renders.scores.as_dict() if renders.scores else None,
        "grid": {
            "prompts": renders.prompts,
            "weights": list(cfg.weights),
            "seeds": list(range(len(renders.prompts))),
            "file": "report_grid.png",
        } if renders.rows else None,
        "renders_skipped": skipped,
        "settings": {
            "timesteps": "100, 300, 500, 700, 900 for every image; fixed noise (seed 1234)",
            "sampler_steps": config.sample.steps,
            "guidance_scale": config.sample.guidance_scale,
        },
    }
    files = ["report.json", "report.png"] + (["report_grid.png"] if renders.rows else [])
    with phase("report", "writing " + ", ".join(files)):
        write_report_files(report, renders, config, output_dir)
    return report


def write_report_files(report: dict, renders: Renders, config: JobConfig, output_dir: Path) -> None:
    """report_grid.png (when there is a grid), report.json and report.png, each atomically."""
    weights = config.report.weights
    if renders.rows:
        grid = image_grid(
            [im for row in renders.rows for im in row],
            columns=len(weights),
            labels=[f"weight {w:g}: {p}" for p in renders.prompts for w in weights],
        )
        with atomic_path(output_dir / "report_grid.png") as tmp:
            grid.save(tmp, format="PNG")
    with atomic_path(output_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    plot_report(report, renders.rows, weights, config.train.name, output_dir / "report.png")
