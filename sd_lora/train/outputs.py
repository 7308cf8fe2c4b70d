"""What a training run leaves for people to look at: the loss log and plot, sample grids, the
exported adapter files and a summary."""

from __future__ import annotations

import csv
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from sd_lora.adapters.files import save_adapter
from sd_lora.adapters.tool_support import ROW_DORA, dora_axes
from sd_lora.config import JobConfig, SampleConfig
from sd_lora.data.captions import detect_trigger
from sd_lora.formats.adapter_state import for_comfyui
from sd_lora.formats.metadata import TrainingInfo
from sd_lora.generate.render import RenderSettings, image_grid, render, save_png
from sd_lora.lora.inject import base_weights, read_adapter_state
from sd_lora.train.optimizers import optimizer_label
from sd_lora.util.atomic import write_bytes_atomically
from sd_lora.util.dtypes import DTYPES
from sd_lora.util.processes import say

logger = logging.getLogger(__name__)


class RunLog:
    """Per-step loss and learning rate: to TensorBoard (through Accelerate) and to loss.csv."""

    HEADER = "step,loss,lr,epoch\n"

    def __init__(self, output_dir: Path, accelerator, resumed_at: int = 0) -> None:
        """`resumed_at`: the step of the checkpoint a resumed run continues from (0: a new run)."""
        self.path = output_dir / "loss.csv"
        self.accelerator = accelerator
        self.started_at = datetime.now(UTC)
        self.write_failed = False
        if accelerator.is_main_process:
            kept = self.rows_up_to(resumed_at) if resumed_at else []
            write_bytes_atomically(self.path, (self.HEADER + "".join(kept)).encode())

    def rows_up_to(self, step: int) -> list[str]:
        """The log's rows up to `step`: the steps after the checkpoint are trained again on a
        resume, and kept they would be logged (and plotted) twice. A row cut short by a kill
        (it never has its four fields) is dropped too."""
        try:
            lines = self.path.read_text().splitlines()[1:]
        except FileNotFoundError:
            return []
        kept = []
        for line in lines:
            fields = line.split(",")
            if len(fields) == 4 and fields[0].isdigit() and int(fields[0]) <= step:
                kept.append(line + "\n")
        return kept

    def step(self, step: int, loss: float, lr: float, epoch: int) -> None:
        self.accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)
        if self.accelerator.is_main_process:
            try:
                with self.path.open("a") as handle:
                    handle.write(f"{step},{loss:.6f},{lr:.6g},{epoch}\n")
            except OSError as e:  # a full disk: the log can wait, the run should not die of it
                if not self.write_failed:
                    logger.warning("cannot append to %s (%s); the loss log has a gap from step %d "
                                   "(the next checkpoint will say whether the disk is full)",
                                   self.path, e.strerror or e, step)
                self.write_failed = True

    def plot(self) -> Path:
        """loss.png: raw per-step loss and its moving average."""
        # The object API, not pyplot: no global backend switch (it would break notebooks).
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = list(csv.DictReader(self.path.open()))
        steps = [int(r["step"]) for r in rows]
        losses = [float(r["loss"]) for r in rows]
        window = max(1, min(len(losses), max(5, len(losses) // 20)))
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
                  for i in range(len(losses))]
        fig = Figure(figsize=(6, 3.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(steps, losses, alpha=0.35, label="loss")
        ax.plot(steps, smooth, label=f"moving average ({window})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("denoising loss (MSE)")
        ax.legend()
        fig.tight_layout()
        out = self.path.with_suffix(".png")
        fig.savefig(out)
        return out


def sample_prompts(cfg: SampleConfig, captions: list[str], count: int = 3) -> list[str]:
    """The configured prompts, or else the first `count` distinct captions of the dataset."""
    if cfg.prompts:
        return list(cfg.prompts)
    return list(dict.fromkeys(c for c in captions if c))[:count] or [""]


def render_sample_grid(pipe, cfg: SampleConfig, prompts: list[str], resolution: int,
                       path: Path, advance=None) -> Path:
    """One image per prompt (with its fixed seed), in a row, labelled by prompt. `advance`:
    called with 1 after each image (a progress bar's update), if given."""
    seeds = cfg.seeds or tuple(range(len(prompts)))
    images = []
    for p, s in zip(prompts, seeds):
        images.append(render(pipe, RenderSettings(
            prompt=p, seed=s, negative_prompt=cfg.negative_prompt, steps=cfg.steps,
            guidance_scale=cfg.guidance_scale, width=resolution, height=resolution)))
        if advance is not None:
            advance(1)
    return save_png(image_grid(images, columns=len(images), labels=prompts), path)


def export_adapters(trained, family: str, prediction_type: str, config: JobConfig, scan,
                    resolution: int, output_dir: Path, started_at: float,
                    buckets: dict | None = None, variant: str | None = None) -> dict[str, Path]:
    """Write the adapter in every configured format; returns {format: path}. `buckets`: the
    bucket plan (data.buckets.bucket_info) when training was bucketed; `variant`: SD3's
    (models.families.model_variant)."""
    state = read_adapter_state(trained, family)
    info = training_info(config, family, prediction_type, scan, resolution, started_at, buckets,
                         variant)
    dtype = DTYPES[config.export.dtype]
    files = {}
    for fmt in config.export.formats:
        path = adapter_path(output_dir, config.train.name, fmt)
        files[fmt] = save_adapter(state, path, format=fmt, info=info, dtype=dtype)
    if "kohya" in files and "row" in dora_axes(state):
        # ComfyUI divides per-row magnitudes by the base weight's norms: a file of its own.
        path = adapter_path(output_dir, config.train.name, "comfyui")
        files["comfyui"] = save_adapter(for_comfyui(state, base_weights(trained)), path,
                                        format="kohya", info=info, dtype=dtype)
        say(f"note: {ROW_DORA}; for ComfyUI use {path.name}, written for its formula")
    return files


def adapter_path(output_dir: Path, name: str, fmt: str) -> Path:
    if fmt == "kohya":
        return output_dir / f"{name}.safetensors"
    if fmt == "comfyui":  # written beside the kohya file for DoRA runs (export_adapters)
        return output_dir / f"{name}-comfyui.safetensors"
    return output_dir / f"{name}-diffusers" / "pytorch_lora_weights.safetensors"


def training_info(config: JobConfig, family: str, prediction_type: str, scan, resolution: int,
                  started_at: float, buckets: dict | None = None,
                  variant: str | None = None) -> TrainingInfo:
    """What the file's `ss_*`/`modelspec.*` metadata says about this run."""
    lora, train, data = config.lora, config.train, config.data
    bucketing = {}
    if buckets is not None:  # sd-scripts' keys; the bounds as resolved at this resolution
        bucketing = {"ss_enable_bucket": True, "ss_bucket_info": json.dumps(buckets),
                     "ss_min_bucket_reso": data.min_bucket_reso or resolution // 2,
                     "ss_max_bucket_reso": data.max_bucket_reso or resolution * 2,
                     "ss_bucket_no_upscale": data.bucket_no_upscale}
    network_args = {"unet_targets": ",".join(lora.unet_targets)}
    if lora.train_text_encoder:
        network_args["text_encoder_targets"] = ",".join(lora.text_encoder_targets)
    if "conv" in lora.unet_targets:  # sd-scripts' LoCon arguments
        network_args.update(conv_dim=str(lora.conv_r), conv_alpha=str(lora.conv_alpha))
    if lora.use_dora:
        network_args["dora_wd"] = "True"  # LyCORIS' name for DoRA
    for name in ("rank_dropout", "module_dropout"):  # sd-scripts' network_args
        if getattr(lora, name):
            network_args[name] = str(getattr(lora, name))
    if train.loraplus_lr_ratio:
        network_args["loraplus_lr_ratio"] = str(train.loraplus_lr_ratio)  # sd-scripts' name
    return TrainingInfo(
        name=train.name,
        family=family,
        prediction_type=prediction_type,
        variant=variant,
        resolution=resolution,
        base_model=config.model.base,
        steps=train.max_steps,
        learning_rate=train.learning_rate,
        unet_lr=train.learning_rate,
        text_encoder_lr=train.text_encoder_learning_rate if lora.train_text_encoder else None,
        seed=train.seed,
        num_train_images=scan.num_train_items,
        num_reg_images=scan.regularization_items or None,
        tag_frequency=scan.tag_frequency(),
        comment=config.export.comment or None,
        mixed_precision=train.mixed_precision,
        network_args=network_args,
        min_snr_gamma=train.min_snr_gamma or None,
        noise_offset=train.noise_offset or None,
        prior_loss_weight=config.data.regularization_weight if config.data.regularization else None,
        recipe={  # the names sd-scripts gives the same settings
            "ss_lr_scheduler": train.lr_scheduler, "ss_lr_warmup_steps": train.lr_warmup_steps,
            "ss_caption_dropout_rate": config.data.caption_dropout,
            "ss_shuffle_caption": config.data.shuffle_tags, "ss_keep_tokens": config.data.keep_tokens,
            **({"ss_network_dropout": lora.network_dropout} if lora.network_dropout else {}),
            "ss_loss_type": train.loss, **({"ss_huber_c": train.huber_c} if train.loss != "l2" else {}),
            "ss_batch_size_per_device": train.batch_size,
            "ss_gradient_accumulation_steps": train.gradient_accumulation_steps,
            "ss_optimizer": optimizer_label(train),
            **({"ss_zero_terminal_snr": True} if train.zero_terminal_snr else {}),
            **({"ss_adaptive_noise_scale": train.adaptive_noise_scale}
               if train.adaptive_noise_scale else {}),
            **({"ss_multires_noise_iterations": train.multires_noise_iterations,
                "ss_multires_noise_discount": train.multires_noise_discount}
               if train.multires_noise_iterations else {}),
            **({"ss_debiased_estimation": True} if train.debiased_estimation else {}),
            **({"ss_masked_loss": True} if config.data.masked_loss else {}),
            **bucketing,
        },
        trigger_phrase=detect_trigger([s.caption for s in scan.samples]),
        started_at=started_at,
        finished_at=time.time(),
    )


def write_summary(output_dir: Path, before: float, after: float, steps: int, seconds: float,
                  files: dict[str, Path], skipped_steps: int = 0,
                  validation: dict | None = None) -> Path:
    summary = {
        "eval_loss_before": before,
        "eval_loss_after": after,
        "eval_loss_change": (after - before) / before if before else None,
        "steps": steps,
        "skipped_nonfinite_steps": skipped_steps,  # NaN/inf loss, gradients or update (nonfinite.py)
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / steps, 4) if steps else None,
        "adapters": {fmt: str(p) for fmt, p in files.items()},
    }
    if validation is not None:  # best_loss, best_step, best adapter files, stopped_early
        summary["validation"] = validation
    path = output_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
