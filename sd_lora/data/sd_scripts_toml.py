"""Read an sd-scripts dataset config (`--dataset_config dataset.toml`) so users bring theirs.

    [general]                      defaults for every dataset and subset
    [[datasets]]                   resolution, batch_size, enable_bucket, bucket settings, ...
      [[datasets.subsets]]         image_dir, num_repeats, is_reg, class_tokens, captions ...

It becomes sd-lora settings (`JobConfig` fields: resolution, batch size, buckets, tag
shuffling, flips, crops, caption extension) plus a list of subsets, each an image folder with
its repeats and caption options; `is_reg` subsets are the regularization images. A key
sd-scripts does not have is an error naming it (and the closest known key); a key sd-scripts
has but sd-lora does not implement is an error naming it too, never silently ignored. Values
that sd-lora applies to the whole run (resolution, flips, tag shuffling) must agree between
datasets and subsets.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from sd_lora.errors import UserError

# Keys sd-lora reads, by where sd-scripts allows them (general keys may stand at any level).
DATASET_KEYS = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso",
                "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"}
SUBSET_KEYS = {"image_dir", "num_repeats", "is_reg", "class_tokens", "caption_extension",
               "shuffle_caption", "keep_tokens", "caption_dropout_rate", "flip_aug",
               "random_crop", "caption_prefix", "caption_suffix"}
# sd-scripts keys that sd-lora does not implement: refused by name.
NOT_IMPLEMENTED = {
    "color_aug", "face_crop_aug_range", "metadata_file", "token_warmup_min", "token_warmup_step",
    "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "keep_tokens_separator",
    "secondary_separator", "enable_wildcard", "conditioning_data_dir", "cache_info",
    "alpha_mask", "caption_separator", "custom_attributes", "validation_seed",
    "validation_split", "resize_interpolation", "network_multiplier",
}
# The values applied to the whole run: one per job, so datasets and subsets must agree.
RUN_WIDE = ("resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
            "bucket_reso_steps", "bucket_no_upscale", "shuffle_caption", "keep_tokens",
            "flip_aug", "random_crop", "caption_extension")


class DatasetTomlError(UserError):
    """The sd-scripts dataset config cannot be used; the message names the key and file."""


@dataclass(frozen=True)
class Subset:
    image_dir: Path
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str = ""  # the caption of images without one (sd-scripts' DreamBooth style)
    caption_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""


@dataclass(frozen=True)
class DatasetToml:
    settings: dict  # run-wide sd-scripts keys -> value
    subsets: tuple[Subset, ...]
    path: Path


def read_dataset_toml(path: str | Path) -> DatasetToml:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetTomlError(f"dataset config {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise DatasetTomlError(f"{path} is not valid TOML: {e}") from None
    _check_keys(raw, {"general", "datasets"}, path, "top level")
    general = raw.get("general", {})
    _check_keys(general, DATASET_KEYS | SUBSET_KEYS - {"image_dir"}, path, "[general]")
    datasets = raw.get("datasets", [])
    if not datasets:
        raise DatasetTomlError(f"{path}: no [[datasets]]; sd-scripts' layout is [[datasets]] "
                               "with [[datasets.subsets]] holding image_dir")
    settings: dict = {}
    subsets: list[Subset] = []
    for i, dataset in enumerate(datasets):
        where = f"[[datasets]] #{i + 1}"
        _check_keys(dataset, DATASET_KEYS | SUBSET_KEYS - {"image_dir"} | {"subsets"}, path, where)
        for j, subset in enumerate(dataset.get("subsets", [])):
            here = f"{where} subset #{j + 1}"
            _check_keys(subset, SUBSET_KEYS, path, here)
            merged = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}, **subset}
            subsets.append(_subset(merged, path, here))
            _agree(settings, merged, path, here)
    if not subsets:
        raise DatasetTomlError(f"{path}: no [[datasets.subsets]] with an image_dir")
    if all(s.is_reg for s in subsets):
        raise DatasetTomlError(f"{path}: every subset is is_reg = true; at least one must train")
    return DatasetToml(settings, tuple(subsets), path)


def _check_keys(table: dict, allowed: set[str], path: Path, where: str) -> None:
    for key in table:
        if key in allowed:
            continue
        if key in NOT_IMPLEMENTED:
            raise DatasetTomlError(f"{path}: {where}: sd-scripts' {key!r} is not implemented in "
                                   "sd-lora; remove it (nothing was changed)")
        close = difflib.get_close_matches(key, sorted(allowed | NOT_IMPLEMENTED), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetTomlError(f"{path}: {where}: unknown key {key!r}{hint}")


def _subset(merged: dict, path: Path, where: str) -> Subset:
    if "image_dir" not in merged:
        raise DatasetTomlError(f"{path}: {where} has no image_dir")
    folder = Path(str(merged["image_dir"])).expanduser()
    if not folder.is_absolute():
        folder = (path.parent / folder).resolve()  # relative to the TOML file, not the shell
    repeats = merged.get("num_repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        raise DatasetTomlError(f"{path}: {where}: num_repeats = {repeats!r} must be a positive integer")
    rate = merged.get("caption_dropout_rate", 0.0)
    if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise DatasetTomlError(f"{path}: {where}: caption_dropout_rate = {rate!r} must be in [0, 1]")
    return Subset(folder, repeats, bool(merged.get("is_reg", False)),
                  str(merged.get("class_tokens", "")), float(rate),
                  str(merged.get("caption_prefix", "")), str(merged.get("caption_suffix", "")))


def _agree(settings: dict, merged: dict, path: Path, where: str) -> None:
    for key in RUN_WIDE:
        if key not in merged:
            continue
        value = merged[key]
        if key == "resolution" and isinstance(value, list):
            if len(value) != 2 or value[0] != value[1]:
                raise DatasetTomlError(f"{path}: {where}: resolution {value} is not square; "
                                       "sd-lora trains one square resolution (use enable_bucket "
                                       "for other shapes)")
            value = value[0]
        if key in settings and settings[key] != value:
            raise DatasetTomlError(f"{path}: {where}: {key} = {value!r}, but another subset or "
                                   f"dataset has {settings[key]!r}; sd-lora applies one {key} to "
                                   "the whole run")
        settings[key] = value


# sd-scripts key -> (sd-lora section, field, conversion)
FIELD_MAP = {
    "resolution": ("data", "resolution", int),
    "batch_size": ("train", "batch_size", int),
    "enable_bucket": ("data", "enable_bucket", bool),
    "min_bucket_reso": ("data", "min_bucket_reso", int),
    "max_bucket_reso": ("data", "max_bucket_reso", int),
    "bucket_reso_steps": ("data", "bucket_reso_steps", int),
    "bucket_no_upscale": ("data", "bucket_no_upscale", bool),
    "shuffle_caption": ("data", "shuffle_tags", bool),
    "keep_tokens": ("data", "keep_tokens", int),
    "flip_aug": ("data", "random_flip", bool),
    "random_crop": ("data", "center_crop", lambda v: not v),
    "caption_extension": ("data", "caption_extensions", lambda v: (str(v),)),
}


def apply_settings(config, toml: DatasetToml):
    """`config` with the dataset TOML's run-wide settings in their sd-lora fields."""
    sections: dict[str, dict] = {}
    for key, value in toml.settings.items():
        section, field, convert = FIELD_MAP[key]
        sections.setdefault(section, {})[field] = convert(value)
    return replace(config, **{name: replace(getattr(config, name), **fields)
                              for name, fields in sections.items()})
