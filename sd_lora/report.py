"""The quality report written after every training run: `report.json` and `report.png`.

What a person wants to know about a style adapter, measured rather than eyeballed:
- does it fit the style? The denoising loss on held-out images in the style, with the adapter at
  weight 0 (the base) and 1, on fixed timesteps and noise (`sd_lora.evaluate`);
- does it leak? The same on images NOT in the style, captioned without the trigger word;
- what does it look like? A grid of fixed prompts and seeds at adapter weights 0, 0.5 and 1 (a
  row without the trigger word shows leakage);
- on the toy world, a style score of generations (`sd_lora.world.scorer`) with and without the
  adapter, for prompts with the trigger word and without.

The adapter's weight is set on the trained (PEFT) layers in place (`inject.lora_weight`), so
nothing is reloaded; tests check that these layers and the exported files give the same outputs.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd_lora.atomic import atomic_path
from sd_lora.config import JobConfig, ReportConfig
from sd_lora.data import DatasetScan, load_image, scan_dataset
from sd_lora.evaluate import eval_loss, make_eval_batch
from sd_lora.inject import lora_weight
from sd_lora.sampling import RenderSettings, image_grid, render
from sd_lora.text import text_encoders_of, tokenizers_of

TRIGGER_SHARE = 0.8  # a first caption tag this common is the trigger word
GENERATED_OFF_STYLE_IMAGES = 8  # renders of the base when no off-style folder is given
STYLE_SCORE_PROMPTS = 8


@dataclass(frozen=True)
class LossComparison:
    source: str  # where the images came from, in words
    images: int
    base: float  # adapter weight 0
    adapter: float  # adapter weight 1

    @property
    def change(self) -> float:
        """Relative change: -0.3 is a 30% lower loss with the adapter."""
        return (self.adapter - self.base) / self.base if self.base else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "change": round(self.change, 4)}


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


def detect_trigger(captions: list[str]) -> str | None:
    """The first comma-separated tag, if at least TRIGGER_SHARE of the captions start with it."""
    firsts = Counter(c.split(",")[0].strip() for c in captions if c.strip())
    if not firsts:
        return None
    tag, n = firsts.most_common(1)[0]
    return tag if tag and n >= TRIGGER_SHARE * len(captions) else None


def strip_trigger(caption: str, trigger: str | None) -> str:
    """The caption without its leading trigger tag ("zkstripes, a red circle" -> "a red circle")."""
    if not trigger:
        return caption
    head, sep, rest = caption.partition(",")
    return rest.strip() if sep and head.strip() == trigger else caption


# --- image sets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    pixels: torch.Tensor  # (n, 3, H, W) in [-1, 1]
    captions: list[str]
    source: str


def folder_images(folder: str, resolution: int, limit: int, caption_extensions) -> ImageSet:
    scan = scan_dataset(Path(folder), caption_extensions=caption_extensions)
    samples = scan.samples[:limit]
    pixels = torch.stack([load_image(s.image, resolution, center_crop=True) for s in samples])
    return ImageSet(pixels, [s.caption for s in samples], f"{len(samples)} images from {folder}")


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
        return folder_images(folder, resolution, cfg.max_images, caption_extensions)
    samples = scan.samples[: min(cfg.max_images, 4)]
    pixels = torch.stack([load_image(s.image, resolution, center_crop=True) for s in samples])
    return ImageSet(
        pixels,
        [s.caption for s in samples],
        f"{len(samples)} TRAINING images (no held-out set: set report.heldout, or put one in heldout/<name> beside the data folder)",
    )


def pil_to_pixels(image: Image.Image) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


def off_style_images(
    folder: str,
    cfg: ReportConfig,
    pipe,
    models,
    captions: list[str],
    trigger: str | None,
    resolution: int,
    caption_extensions,
) -> ImageSet:
    if folder:
        return folder_images(folder, resolution, cfg.max_images, caption_extensions)
    prompts = list(dict.fromkeys(strip_trigger(c, trigger) for c in captions))
    prompts = prompts[: min(cfg.max_images, GENERATED_OFF_STYLE_IMAGES)]
    with lora_weight(models, 0.0):
        images = [
            render(pipe, RenderSettings(prompt=p, seed=i, width=resolution, height=resolution))
            for i, p in enumerate(prompts)
        ]
    return ImageSet(
        torch.stack([pil_to_pixels(im) for im in images]),
        prompts,
        f"{len(prompts)} renders of the base for the training captions without the "
        "trigger word (no off-style folder: set report.off_style)",
    )


def compare_losses(pipe, schedule, models, images: ImageSet) -> LossComparison:
    batch = make_eval_batch(images.pixels, images.captions, pipe.vae, tokenizers_of(pipe))
    losses = []
    for weight in (0.0, 1.0):
        with lora_weight(models, weight):
            losses.append(eval_loss(pipe.unet, text_encoders_of(pipe), schedule, batch))
    return LossComparison(
        images.source, len(images.captions), round(losses[0], 6), round(losses[1], 6)
    )


# --- generations -----------------------------------------------------------------------------


def render_at(
    pipe, models, weight: float, prompt: str, seed: int, config: JobConfig, resolution: int
) -> Image.Image:
    sample = config.sample
    with lora_weight(models, weight):
        return render(
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


def grid_prompts(config: JobConfig, captions: list[str], trigger: str | None) -> list[str]:
    from sd_lora.run_outputs import sample_prompts

    prompts = list(config.report.prompts) or sample_prompts(config.sample, captions)
    leak_row = strip_trigger(prompts[0], trigger)
    return prompts + [leak_row] if leak_row not in prompts else prompts


def before_after_images(
    pipe, models, config: JobConfig, prompts: list[str], resolution: int
) -> list[list[Image.Image]]:
    """rows[prompt][weight], seed i for row i."""
    return [
        [render_at(pipe, models, w, p, i, config, resolution) for w in config.report.weights]
        for i, p in enumerate(prompts)
    ]


def report_style(config: JobConfig, trigger: str | None) -> str | None:
    """Which toy style to score, or None."""
    from sd_lora.world.styles import STYLES, TOY_STYLES

    chosen = config.report.style
    if chosen == "none":
        return None
    if chosen != "auto":
        return chosen
    if config.model.base != "toy" or trigger is None:
        return None
    return next((name for name in TOY_STYLES if STYLES[name].trigger == trigger), None)


def style_scores(
    pipe,
    models,
    config: JobConfig,
    style: str,
    prompts: list[str],
    trigger: str | None,
    resolution: int,
) -> StyleScores:
    from sd_lora.world.scorer import style_score

    prompts = prompts[:STYLE_SCORE_PROMPTS]

    def mean_score(weight: float, texts: list[str]) -> float:
        scores = [
            style_score(render_at(pipe, models, weight, t, 100 + i, config, resolution), style)
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


# --- writing -----------------------------------------------------------------------------------


def write_quality_report(
    pipe, models, schedule, config: JobConfig, scan: DatasetScan, resolution: int, output_dir: Path
) -> dict:
    """Measure, then write report.json, report.png and report_grid.png; returns the report."""
    cfg = config.report
    exts = config.data.caption_extensions
    models = list(models)
    captions = [s.caption for s in scan.samples]
    trigger = detect_trigger(captions)
    heldout = heldout_images(heldout_folder(cfg, config.data.path), cfg, scan, resolution, exts)
    off_style = off_style_images(
        off_style_folder(cfg, config.data.path),
        cfg,
        pipe,
        models,
        captions,
        trigger,
        resolution,
        exts,
    )
    style_loss = compare_losses(pipe, schedule, models, heldout)
    leak_loss = compare_losses(pipe, schedule, models, off_style)
    prompts = grid_prompts(config, captions, trigger)
    rows = before_after_images(pipe, models, config, prompts, resolution)
    style = report_style(config, trigger)
    scores = (
        style_scores(pipe, models, config, style, heldout.captions, trigger, resolution)
        if style
        else None
    )
    report = {
        "trigger_word": trigger,
        "heldout_style_loss": style_loss.as_dict(),
        "off_style_loss": leak_loss.as_dict(),
        "style_score": scores.as_dict() if scores else None,
        "grid": {
            "prompts": prompts,
            "weights": list(cfg.weights),
            "seeds": list(range(len(prompts))),
            "file": "report_grid.png",
        },
        "settings": {
            "timesteps": "100, 300, 500, 700, 900 for every image; fixed noise (seed 1234)",
            "sampler_steps": config.sample.steps,
            "guidance_scale": config.sample.guidance_scale,
        },
    }
    grid = image_grid(
        [im for row in rows for im in row],
        columns=len(cfg.weights),
        labels=[f"weight {w:g}: {p}" for p in prompts for w in cfg.weights],
    )
    with atomic_path(output_dir / "report_grid.png") as tmp:
        grid.save(tmp, format="PNG")
    with atomic_path(output_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    plot_report(report, rows, config, output_dir / "report.png")
    return report


def verdict_lines(report: dict) -> list[str]:
    style, leak = report["heldout_style_loss"], report["off_style_loss"]
    lines = [
        f"held-out style loss {style['base']:.4f} -> {style['adapter']:.4f} "
        f"({style['change']:+.1%}; lower is better)",
        f"off-style loss {leak['base']:.4f} -> {leak['adapter']:.4f} "
        f"({leak['change']:+.1%}; near 0 means no leakage)",
    ]
    if report["style_score"]:
        s = report["style_score"]
        lines.append(
            f"{s['style']} score with the trigger {s['with_trigger']['base']:.2f} -> "
            f"{s['with_trigger']['adapter']:.2f}; without {s['without_trigger']['base']:.2f} -> "
            f"{s['without_trigger']['adapter']:.2f} (0 = plain world, 1 = the style)"
        )
    return lines


def plot_report(report: dict, rows: list[list[Image.Image]], config: JobConfig, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = config.report.weights
    n_rows = len(rows)
    bars = 3 if report["style_score"] else 2
    fig = plt.figure(figsize=(4 + 1.6 * len(weights) + 3.2 * bars / 2, 1.2 + 1.6 * max(n_rows, 2)))
    grid_spec = fig.add_gridspec(2, 2, width_ratios=[1.6 * len(weights), 3.2], hspace=0.45)
    image_axis = fig.add_subplot(grid_spec[:, 0])
    cells = [np.concatenate([np.asarray(im.convert("RGB")) for im in row], axis=1) for row in rows]
    image_axis.imshow(np.concatenate(cells, axis=0), interpolation="nearest")
    h, w = rows[0][0].size[1], rows[0][0].size[0]
    image_axis.set_xticks(
        [w * (i + 0.5) for i in range(len(weights))], [f"weight {x:g}" for x in weights]
    )
    image_axis.set_yticks(
        [h * (i + 0.5) for i in range(n_rows)],
        [_wrap(p) for p in report["grid"]["prompts"]],
        fontsize=7,
    )
    image_axis.set_title("fixed prompts and seeds, adapter weight per column", fontsize=9)
    loss_axis = fig.add_subplot(grid_spec[0, 1])
    names = ["held-out\nstyle", "off-style"]
    base = [report["heldout_style_loss"]["base"], report["off_style_loss"]["base"]]
    adapter = [report["heldout_style_loss"]["adapter"], report["off_style_loss"]["adapter"]]
    _paired_bars(loss_axis, names, base, adapter, "denoising loss (fixed noise)")
    if report["style_score"]:
        s = report["style_score"]
        score_axis = fig.add_subplot(grid_spec[1, 1])
        _paired_bars(
            score_axis,
            ["with trigger", "without"],
            [s["with_trigger"]["base"], s["without_trigger"]["base"]],
            [s["with_trigger"]["adapter"], s["without_trigger"]["adapter"]],
            f"{s['style']} score of generations",
        )
    # Above the figure (the tight bounding box grows to hold it): inside, its lines overlapped
    # the grid's title when the grid has few rows.
    fig.suptitle(
        f"{config.train.name}: " + "\n".join(verdict_lines(report)), fontsize=8, x=0.02,
        y=1.0, ha="left", va="bottom",
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _paired_bars(axis, names, base, adapter, title) -> None:
    x = np.arange(len(names))
    axis.bar(x - 0.2, base, 0.4, label="base (weight 0)", color="#9aa5b1")
    axis.bar(x + 0.2, adapter, 0.4, label="with adapter", color="#d9480f")
    axis.set_xticks(x, names, fontsize=8)
    axis.set_title(title, fontsize=9)
    axis.tick_params(labelsize=7)
    axis.legend(fontsize=7)


def _wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3])
