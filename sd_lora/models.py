"""Load a base model: the built-in toy or tiny one, a diffusers folder, a hub id, or a single file.

`load_pipeline(base)` accepts:
- "toy": the built-in base pretrained on the toy world (`sd_lora.world.toy_base`), 64 px;
- "tiny": the built-in random SD 1.x-topology model for plumbing tests (`sd_lora.tiny`);
- "tiny-sdxl": its SDXL-topology counterpart (`sd_lora.tiny_variants`);
- a local diffusers folder (the one holding `model_index.json`) of SD 1.x, 2.x or SDXL;
- a Hugging Face hub id `org/name`: read from the local cache first (`HF_HUB_CACHE` /
  `HF_HOME`), downloaded only when not cached and `HF_HUB_OFFLINE` is not set; a local path of
  the same name is taken first, unless written `hf://org/name` (what the app passes): then
  nothing on disk outside the hub cache is looked at;
- a single-file A1111/LDM `.safetensors` checkpoint of SD 1.x, 2.x or SDXL, loaded offline
  (`sd_lora.single_file`). Pickle checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused
  unless `allow_pickle`, and then read by torch's weights-only unpickler (`sd_lora.pickles`).

Every loaded pipeline is frozen (no parameter requires grad) and in eval mode, in `dtype`;
training code adds LoRA layers on top.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from sd_lora import pickles
from sd_lora.errors import UserError
from sd_lora.tiny import build_tiny_pipeline
from sd_lora.tiny_variants import build_tiny_sdxl_pipeline
from sd_lora.world.toy_base import toy_base_path

BUILTIN_BASES = ("toy", "tiny", "tiny-sdxl")
RANDOM_BASES = ("tiny", "tiny-sdxl")  # random weights, for tests: their images are noise
# The pipeline classes a diffusers folder may name, and the extra arguments each is built with.
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": (StableDiffusionPipeline, dict(
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)),
    "StableDiffusionXLPipeline": (StableDiffusionXLPipeline, dict(add_watermarker=False)),
}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SINGLE_FILE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = pickles.PICKLE_SUFFIXES
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
HUB_PREFIX = "hf://"  # `hf://org/name`: a hub id only, never a local path
HUB_PROBE_TIMEOUT_S = 10
ACCEPTED_FORMS = (
    '"toy" (the built-in toy-world model); "tiny" or "tiny-sdxl" (built-in random test '
    "models); a diffusers folder (SD 1.x, 2.x or SDXL) containing model_index.json; "
    'a Hugging Face hub id such as "runwayml/stable-diffusion-v1-5" ("hf://org/name": never '
    "a local path); "
    "or a single-file SD 1.x/2.x/SDXL checkpoint ending in .safetensors"
)


class BaseModelError(UserError):
    """A base model that cannot be found or loaded; the message says what to do."""


def load_pipeline(
    base: str, *, dtype: torch.dtype = torch.float32, prediction_type: str | None = None,
    allow_pickle: bool = False,
) -> DiffusionPipeline:
    """Load `base` frozen, in `dtype`; `prediction_type` overrides the scheduler's when given.
    A .ckpt base is refused unless `allow_pickle` (see sd_lora.pickles)."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise BaseModelError(
            f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
        )
    base = os.fspath(base)
    path = Path(base).expanduser()
    kind = base_kind(base)
    if kind == "tiny":
        pipe = build_tiny_pipeline()
    elif kind == "tiny-sdxl":
        pipe = build_tiny_sdxl_pipeline()
    elif kind == "toy":
        pipe = _load_toy(dtype)
    elif kind == "folder":
        pipe = _load_folder(path, dtype)
    elif kind == "file":
        pipe = _load_file(path, dtype, prediction_type, allow_pickle)
    else:
        pipe = _load_hub(base, dtype)
    if prediction_type is not None and prediction_type_of(pipe) != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=prediction_type
        )
    return freeze(_cast(pipe, dtype))


def base_kind(base: str) -> str:
    """What `base` names, without loading anything: "tiny", "toy", "folder", "file" or "hub";
    raises BaseModelError for a path that does not exist or a name of no accepted form."""
    base = os.fspath(base)
    path = Path(base).expanduser()
    if base in BUILTIN_BASES:
        return base
    if base.startswith(HUB_PREFIX):  # before any look at the disk
        if HUB_ID.match(hub_repo_id(base)):
            return "hub"
        raise BaseModelError(f"base {base!r}: give an org/name hub id after {HUB_PREFIX}")
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES + PICKLE_SUFFIXES:
        raise BaseModelError(f"base {base!r}: no such file")
    if HUB_ID.match(base):
        return "hub"
    raise BaseModelError(
        f"base {base!r} is not an existing file or folder, nor an org/name hub id"
        f"{builtin_suggestion(base) or '.'} Accepted: {ACCEPTED_FORMS}"
    )


def builtin_suggestion(base: str) -> str:
    """'; did you mean 'toy'?' for a near miss of a built-in base's name ("Toy", "tiny_sdxl",
    "toys"), else ''. Built-in names are exact (lower-case): "Toy" could be a folder's name."""
    import difflib

    folded = base.strip().lower().replace("_", "-")
    close = [name for name in BUILTIN_BASES if name == folded]
    close = close or difflib.get_close_matches(folded, BUILTIN_BASES, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _load_toy(dtype: torch.dtype) -> DiffusionPipeline:
    folder = toy_base_path()
    if not (folder / "model_index.json").is_file():
        raise BaseModelError(
            f"the toy base is missing from {folder} (a partial checkout?); rebuild it with "
            "`python -m sd_lora.world.pretrain --work runs/toy-pretrain --install`"
        )
    return _load_folder(folder, dtype)


def _cast(pipe: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
    """Cast only components not already in `dtype`: diffusers' ModelMixin.to(dtype) logs a
    warning on every call (even with no fp32-pinned modules), and loaders already applied it."""
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None and any(p.dtype != dtype for p in module.parameters()):
            module.to(dtype=dtype)
    return pipe


def _load_file(path: Path, dtype: torch.dtype, prediction_type: str | None,
               allow_pickle: bool = False) -> DiffusionPipeline:
    from sd_lora.single_file import load_single_file  # imports this module

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise BaseModelError(str(pickles.refusal(path, "checkpoints")))
        return _load_pickled_checkpoint(path, dtype, prediction_type, load_single_file)
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise BaseModelError(f"{path}: unknown file type {suffix!r}. Accepted: {ACCEPTED_FORMS}")
    return load_single_file(path, dtype, prediction_type)


def _load_pickled_checkpoint(path: Path, dtype, prediction_type, load_single_file):
    """An opted-in .ckpt: its tensors (weights-only unpickler) rewritten as a temporary
    .safetensors file, then the single-file loader as for any checkpoint. The temporary copy
    costs the checkpoint's size in temp space while it loads."""
    try:
        tensors = pickles.load_tensors(path)
    except pickles.PickleRefused as e:
        raise BaseModelError(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="sd_lora_ckpt_") as tmp:
        converted = Path(tmp) / (path.stem + ".safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, converted)
        del tensors
        try:
            return load_single_file(converted, dtype, prediction_type)
        except BaseModelError as e:
            raise BaseModelError(str(e).replace(str(converted), str(path))) from None


def _check_pipeline_class(index: dict, where: str) -> str:
    """The pipeline class name of a model_index.json, if sd-lora can train it."""
    name = index.get("_class_name")
    if name in PIPELINE_CLASSES:
        return name
    raise BaseModelError(
        f"{where} is a {name} pipeline; supported: {', '.join(PIPELINE_CLASSES)} "
        "(SD 1.x, 2.x and SDXL text-to-image bases)"
    )


def _load_folder(path: Path, dtype: torch.dtype) -> DiffusionPipeline:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise BaseModelError(
            f"{path} is a folder but not a diffusers pipeline (no model_index.json); pass the "
            "folder that `save_pretrained` wrote, or a single .safetensors checkpoint file"
        )
    name = _check_pipeline_class(json.loads(index_file.read_text()), str(path))
    try:
        return _from_pretrained(str(path), dtype, name)
    except (OSError, ValueError) as e:
        raise BaseModelError(
            f"{path}: a component of this diffusers folder cannot be loaded (weights are read "
            f"from .safetensors files only; convert .bin weights first): {e}"
        ) from e


def _from_pretrained(source: str, dtype: torch.dtype, class_name: str = "StableDiffusionPipeline",
                     **kwargs) -> DiffusionPipeline:
    cls, extra = PIPELINE_CLASSES[class_name]
    return cls.from_pretrained(
        source,
        dtype=dtype,
        use_safetensors=True,  # never unpickle: .bin weights can run code when loaded
        **extra,
        **kwargs,
    )


# --- Hugging Face hub -----------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return flag.upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def hub_repo_id(base: str) -> str:
    """`org/name` of a hub id, written `org/name` or `hf://org/name`."""
    return base.removeprefix(HUB_PREFIX)


def _load_hub(base: str, dtype: torch.dtype) -> DiffusionPipeline:
    """Always from the repo's folder in the hub cache (fetched there first if allowed): a repo
    id handed to diffusers is read as a local folder when one of that name exists."""
    from huggingface_hub import (
        get_hf_file_metadata,
        hf_hub_download,
        hf_hub_url,
        try_to_load_from_cache,
    )

    repo_id, cache = hub_repo_id(base), hub_cache_dir()
    cached_index = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache)
    if isinstance(cached_index, str):
        name = _check_pipeline_class(json.loads(Path(cached_index).read_text()), repo_id)
        try:
            return _from_pretrained(str(Path(cached_index).parent), dtype, name)
        except (OSError, ValueError):
            pass  # partly cached: fetch the rest below, if allowed
    not_here = (
        f"hub id {base!r} is not (fully) in the Hugging Face cache at {cache}, and"
        if base.startswith(HUB_PREFIX) else
        f"base {base!r} is neither a local file or folder nor (fully) in the Hugging Face "
        f"cache at {cache}, and"
    )
    advice = (
        "Pass a local diffusers folder or a single-file .safetensors checkpoint instead, or "
        "download the model once with network access."
    )
    if hub_offline():
        raise BaseModelError(
            f"{not_here} HF_HUB_OFFLINE is set, so it cannot be downloaded. {advice}"
        )
    try:
        # One request, no retries: hf_hub_download alone retries with back-off for ~25 s offline.
        get_hf_file_metadata(hf_hub_url(repo_id, "model_index.json"), timeout=HUB_PROBE_TIMEOUT_S)
        index = hf_hub_download(repo_id, "model_index.json", cache_dir=cache)
    except Exception as e:  # network, auth, missing repo: all mean "not reachable from here"
        raise BaseModelError(
            f"{not_here} the hub is not reachable for it ({type(e).__name__}: {e}). {advice}"
        ) from e
    name = _check_pipeline_class(json.loads(Path(index).read_text()), repo_id)
    cls, extra = PIPELINE_CLASSES[name]
    try:  # `extra` names the components not to fetch (safety checker, feature extractor)
        folder = cls.download(repo_id, cache_dir=cache, use_safetensors=True, **extra)
        return _from_pretrained(str(folder), dtype, name)
    except Exception as e:
        raise BaseModelError(f"base {base!r}: downloading or loading it failed: {e}") from e


# --- inspection -----------------------------------------------------------------------------


def freeze(pipe: DiffusionPipeline) -> DiffusionPipeline:
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return pipe


def model_family(pipe: DiffusionPipeline) -> str:
    """'sdxl' (two text encoders), 'sd2' or 'sd1'.

    SD 2.x is told apart structurally: its UNet's transformer blocks project in and out with
    Linear layers (SD 1.x: 1x1 convolutions), which also holds for tiny SD 2-topology models;
    a 1024-wide cross-attention (OpenCLIP ViT-H) counts too.
    """
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    unet = pipe.unet
    proj_in = next((m for n, m in unet.named_modules() if n.endswith("proj_in")), None)
    if isinstance(proj_in, torch.nn.Linear) or unet.config.cross_attention_dim == 1024:
        return "sd2"
    return "sd1"


def prediction_type_of(pipe: DiffusionPipeline) -> str:
    return pipe.scheduler.config.get("prediction_type", "epsilon")
