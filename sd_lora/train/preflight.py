"""`sd-lora check`: the whole job checked before any model loads, every problem at once, and the
plan of what will train: how many images at which size, per epoch and in all.

It reads no model weights (the base is only named and found), so it runs in seconds on a
dataset of thousands of images, and its report is the one `sd-lora train` prints first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from sd_lora.config import JobConfig
from sd_lora.data.scan import (
    DatasetScan,
    SkippedFile,
    regularization_layout,
    scan_dataset,
    size_warning,
)
from sd_lora.data.sd_scripts_toml import DatasetToml, apply_settings, read_dataset_toml
from sd_lora.errors import UserError
from sd_lora.models.bases import base_kind, declared_family
from sd_lora.objective import check_options
from sd_lora.train.memory import plan_line
from sd_lora.train.recommended import plan_line as settings_line
from sd_lora.train.recommended import with_recommended
from sd_lora.util.words import plural

BASE_KINDS = {
    "tiny": "the built-in random test model, 64 px",
    "tiny-sdxl": "the built-in random SDXL-topology test model, 64 px",
    "tiny-sd3": "the built-in random SD3.5-topology test model (MMDiT, three text encoders), 64 px",
    "toy": "the built-in toy-world model, 64 px",
    "folder": "a local diffusers folder",
    "file": "a single-file checkpoint",
    "hub": "a Hugging Face hub id (loaded from the local cache when offline)",
}


@dataclass(frozen=True)
class JobCheck:
    config: JobConfig
    base: str  # what the base is, in words
    data: DatasetScan
    regularization: DatasetScan | None

    @property
    def skipped(self) -> int:
        return len(self.data.skipped) + (len(self.regularization.skipped) if self.regularization else 0)

    @property
    def warnings(self) -> int:
        reg = len(self.regularization.warnings) if self.regularization else 0
        return len(self.data.warnings) + reg

    def items_per_epoch(self) -> int:
        """Style items, plus the regularization items laid out to match them."""
        items = self.data.num_train_items
        if self.regularization is None:
            return items
        repeats, count = regularization_layout(items, self.regularization.num_images)
        return items + repeats * count

    def plan(self) -> dict:
        train, data = self.config.train, self.config.data
        per_step = train.batch_size * train.gradient_accumulation_steps
        steps_per_epoch = math.ceil(self.items_per_epoch() / per_step)
        return {
            "base": f"{self.config.model.base} ({self.base})",
            "images": self.data.num_images,
            "items_per_epoch": self.items_per_epoch(),
            "regularization_images": self.regularization.num_images if self.regularization else 0,
            "resolution": data.resolution or "the base's native resolution",
            "crop": "centre" if data.center_crop else "random",
            "buckets": (f"aspect-ratio buckets in steps of {data.bucket_reso_steps} px"
                        + (", no upscaling" if data.bucket_no_upscale else "")
                        if data.enable_bucket else None),
            "random_flip": data.random_flip,
            "images_per_step": per_step,
            "steps": train.max_steps,
            "epochs": round(train.max_steps / steps_per_epoch, 2),
            "skipped_files": self.skipped,
            "warnings": self.warnings,
        }

    def text(self) -> str:
        """The dataset reports, then the plan."""
        lines = [self.data.report()]
        if self.regularization:
            lines.append(self.regularization.report())
        return "\n".join(lines + ["", self.plan_text()])

    def plan_text(self) -> str:
        plan = self.plan()
        size = plan["resolution"]
        size = f"{size}x{size}" if isinstance(size, int) else size
        lines = [
            f"Plan: base {plan['base']}",
            "  " + self._images_line(plan),
            f"  at {size}" + (f" in {plan['buckets']}" if plan["buckets"] else "")
            + f", {plan['crop']} crop" + (", random flips" if plan["random_flip"] else ""),
            f"  {plural(plan['steps'], 'step')} of {plural(plan['images_per_step'], 'image')}: "
            f"{plan['epochs']} epochs",
            "  " + settings_line(self.config),
            f"  {plural(plan['skipped_files'], 'file')} skipped, {plural(plan['warnings'], 'warning')}"
            + (" (listed above)" if plan["skipped_files"] or plan["warnings"] else ""),
        ]
        memory = plan_line(self.config)  # the base's size from its configs or header alone
        return "\n".join(lines + ([memory] if memory else []))

    def at_native_size(self, resolution: int) -> tuple[JobCheck, list[SkippedFile]]:
        """With data.resolution = 0 the images train at the base's native size, known once
        the base has loaded: this check with the size warnings at `resolution` added (those
        the scan could not give), and those warnings."""
        if self.config.data.resolution:
            return self, []

        def small(scan: DatasetScan | None) -> list[SkippedFile]:
            if scan is None:
                return []
            return [SkippedFile(s.image, note) for s in scan.samples
                    if s.size and (note := size_warning(s.size, resolution))]

        data, reg = small(self.data), small(self.regularization)
        return replace(
            self, data=replace(self.data, warnings=self.data.warnings + data),
            regularization=self.regularization and replace(
                self.regularization, warnings=self.regularization.warnings + reg),
        ), data + reg

    def _images_line(self, plan: dict) -> str:
        """'16 images (16 items per epoch)'; with regularization, what each folder adds."""
        if not self.regularization:
            return (f"{plural(plan['images'], 'image')} "
                    f"({plural(plan['items_per_epoch'], 'item')} per epoch)")
        style = self.data.num_train_items
        return (f"{plural(plan['images'], 'image')} + "
                f"{plural(plan['regularization_images'], 'regularization image')} "
                f"({plan['items_per_epoch']} items per epoch: {style} training, "
                f"{plan['items_per_epoch'] - style} regularization)")

    def as_dict(self) -> dict:
        def entries(scan: DatasetScan | None, which: str) -> list[dict]:
            if scan is None:
                return []
            return [{"path": str(e.path), "reason": e.reason} for e in getattr(scan, which)]

        return {"plan": self.plan(),
                "skipped": entries(self.data, "skipped") + entries(self.regularization, "skipped"),
                "warnings": entries(self.data, "warnings") + entries(self.regularization, "warnings")}


def with_dataset_config(config: JobConfig) -> JobConfig:
    """`config` with an sd-scripts dataset config's settings applied (data.dataset_config)."""
    if not config.data.dataset_config:
        return config
    return apply_settings(config, read_dataset_toml(config.data.dataset_config))


def check_for_family(config: JobConfig, family: str) -> None:
    """Refuse settings the base's family cannot use, naming why: before any load when the
    family is declared (`declared_family`), else as soon as the base has loaded."""
    check_options(config.train, flow=family == "sd3")
    if family == "sd3" and config.lora.use_dora and "kohya" in config.export.formats:
        raise UserError(
            "lora.use_dora with export.formats containing \"kohya\" on an SD3 base: the kohya "
            "layout fuses each attention's q, k and v into one qkv module (as sd-scripts and "
            "ComfyUI read it), which cannot carry DoRA's magnitudes. Set export.formats = "
            "[\"diffusers\"] (diffusers applies SD3 DoRA from it), or train a plain LoRA")


def check_job(config: JobConfig) -> JobCheck:
    """Find the base and scan the data and regularization folders (or the subsets of
    data.dataset_config); raises the first error that makes the job impossible (no such base,
    no usable image), naming it. `config` is the one `with_dataset_config` gave; learning
    rates and steps left at 0 become the base's recommendation (sd_lora.train.recommended)."""
    config = with_recommended(config)
    base = BASE_KINDS[base_kind(config.model.base)]
    if (family := declared_family(config.model.base)) is not None:  # else once it has loaded
        check_for_family(config, family)
    min_side = config.data.resolution or 0
    exts = config.data.caption_extensions
    if config.data.dataset_config:
        data, reg = scan_subsets(read_dataset_toml(config.data.dataset_config), exts, min_side)
        return JobCheck(config, base, data, reg)
    data = scan_dataset(Path(config.data.path), caption_extensions=exts, min_side=min_side)
    reg = None
    if config.data.regularization:
        reg = scan_dataset(Path(config.data.regularization), caption_extensions=exts,
                           min_side=min_side)
    return JobCheck(config, base, data, reg)


def scan_subsets(toml: DatasetToml, exts, min_side: int) -> tuple[DatasetScan, DatasetScan | None]:
    """(training images, regularization images or None) of a dataset config's subsets: each
    folder scanned, its images given the subset's repeats, class tokens (for images without a
    caption), caption prefix/suffix and dropout rate."""
    scans: dict[bool, list[DatasetScan]] = {False: [], True: []}
    for subset in toml.subsets:
        scan = scan_dataset(subset.image_dir, caption_extensions=exts, min_side=min_side)
        samples = [replace(s, repeats=subset.num_repeats, subset=subset.image_dir.name,
                           caption=subset.caption_prefix + (s.caption or subset.class_tokens)
                           + subset.caption_suffix,
                           caption_dropout=subset.caption_dropout_rate) for s in scan.samples]
        scans[subset.is_reg].append(replace(scan, samples=samples))

    def merged(parts: list[DatasetScan]) -> DatasetScan | None:
        if not parts:
            return None
        return DatasetScan(parts[0].root, [s for p in parts for s in p.samples],
                           [k for p in parts for k in p.skipped], [w for p in parts for w in p.warnings])

    return merged(scans[False]), merged(scans[True])
