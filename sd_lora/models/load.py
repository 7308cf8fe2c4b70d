"""Load a base model: the built-in toy or tiny one, a diffusers folder, a hub id, or a single file.

`load_pipeline(base)` accepts:
- "toy": the built-in base pretrained on the toy world (`sd_lora.models.builtin.toy`), 64 px;
- "tiny": the built-in random SD 1.x-topology model for plumbing tests (`sd_lora.models.builtin.tiny`);
- "tiny-sdxl": its SDXL-topology counterpart (`sd_lora.models.builtin.tiny_sdxl`);
- "tiny-sd3": an SD3.5-topology one (`sd_lora.models.builtin.tiny_sd3`);
- a local diffusers folder (the one holding `model_index.json`) of SD 1.x, 2.x, SDXL or SD3/3.5;
- a Hugging Face hub id `org/name`: read from the local cache first (`HF_HUB_CACHE` /
  `HF_HOME`), downloaded only when not cached and `HF_HUB_OFFLINE` is not set; a local path of
  the same name is taken first, unless written `hf://org/name` (what the app passes): then
  nothing on disk outside the hub cache is looked at;
- a single-file A1111/LDM `.safetensors` checkpoint of SD 1.x, 2.x or SDXL, or an SD3.5 one
  (Stability's layout, with or without text encoders), loaded offline
  (`sd_lora.models.single_file`, `single_file_sd3`). Pickle checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused
  unless `allow_pickle`, and then read by torch's weights-only unpickler (`sd_lora.util.pickles`).

Every loaded pipeline is frozen (no parameter requires grad) and in eval mode, in `dtype`;
training code adds LoRA layers on top.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import save_file

from sd_lora.models.bases import (
    ACCEPTED_FORMS,
    HUB_PREFIX,
    HUB_PROBE_TIMEOUT_S,
    PICKLE_SUFFIXES,
    SINGLE_FILE_SUFFIXES,
    BaseModelError,
    base_kind,
    hub_cache_dir,
    hub_offline,
    hub_repo_id,
)
from sd_lora.models.builtin.tiny import build_tiny_pipeline
from sd_lora.models.builtin.tiny_sd3 import build_tiny_sd3_pipeline
from sd_lora.models.builtin.tiny_sdxl import build_tiny_sdxl_pipeline
from sd_lora.models.builtin.toy import toy_base_path
from sd_lora.models.families import COMPONENTS, FLOW, freeze, prediction_type_of
from sd_lora.models.single_file import load_single_file
from sd_lora.models.streamed import streamed_components
from sd_lora.util import pickles

# The pipeline classes a diffusers folder may name, and the extra arguments each is built with.
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": (StableDiffusionPipeline, dict(
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)),
    "StableDiffusionXLPipeline": (StableDiffusionXLPipeline, dict(add_watermarker=False)),
    "StableDiffusion3Pipeline": (StableDiffusion3Pipeline, {}),
}
PREDICTION_TYPES = ("epsilon", "v_prediction")
# What a pipeline without SD3's T5 is given in its place (diffusers skips loading a None).
T5_PARTS = (("text_encoder_3", None), ("tokenizer_3", None))


def load_pipeline(
    base: str, *, dtype: torch.dtype = torch.float32, prediction_type: str | None = None,
    allow_pickle: bool = False, load_t5: bool = True,
) -> DiffusionPipeline:
    """Load `base` frozen, in `dtype`; `prediction_type` overrides the scheduler's when given.
    A .ckpt base is refused unless `allow_pickle` (see sd_lora.util.pickles). Without
    `load_t5` an SD3 base comes without its T5 encoder (see config.ModelConfig.load_t5)."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise BaseModelError(
            f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
        )
    base = os.fspath(base)
    path = Path(base).expanduser()
    kind = base_kind(base)
    skipped = {} if load_t5 else dict(T5_PARTS)
    if kind == "tiny":
        pipe = build_tiny_pipeline()
    elif kind == "tiny-sdxl":
        pipe = build_tiny_sdxl_pipeline()
    elif kind == "tiny-sd3":
        pipe = build_tiny_sd3_pipeline()
    elif kind == "toy":
        pipe = _load_toy(dtype)
    elif kind == "folder":
        pipe = _load_folder(path, dtype, skipped)
    elif kind == "file":
        pipe = _load_file(path, dtype, prediction_type, allow_pickle, load_t5)
    else:
        pipe = _load_hub(base, dtype, skipped)
    if not load_t5 and getattr(pipe, "text_encoder_3", None) is not None:
        pipe.text_encoder_3, pipe.tokenizer_3 = None, None  # built with it (built-ins, files)
    if prediction_type is not None and prediction_type_of(pipe) == FLOW:
        raise BaseModelError(
            f"model.prediction_type = {prediction_type!r} does not apply to {base!r}: SD3 bases "
            "are trained with rectified flow (the transformer predicts noise minus image), not "
            "by epsilon or v-prediction; leave model.prediction_type at 'auto'")
    if prediction_type is not None and prediction_type_of(pipe) != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=prediction_type
        )
    return freeze(_cast(pipe, dtype))


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
               allow_pickle: bool = False, load_t5: bool = True) -> DiffusionPipeline:

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise BaseModelError(str(pickles.refusal(path, "checkpoints")))
        return _load_pickled_checkpoint(path, dtype, prediction_type, load_single_file)
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise BaseModelError(f"{path}: unknown file type {suffix!r}. Accepted: {ACCEPTED_FORMS}")
    return load_single_file(path, dtype, prediction_type, load_t5)  # SD3: T5 left unread


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
        "(SD 1.x, 2.x, SDXL and SD3/3.5 text-to-image bases)"
    )


def _load_folder(path: Path, dtype: torch.dtype, skipped: dict | None = None) -> DiffusionPipeline:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise BaseModelError(
            f"{path} is a folder but not a diffusers pipeline (no model_index.json); pass the "
            "folder that `save_pretrained` wrote, or a single .safetensors checkpoint file"
        )
    name = _check_pipeline_class(json.loads(index_file.read_text()), str(path))
    try:
        return _from_pretrained(str(path), dtype, name, **_for(name, skipped))
    except (OSError, ValueError) as e:
        raise BaseModelError(
            f"{path}: a component of this diffusers folder cannot be loaded (weights are read "
            f"from .safetensors files only; convert .bin weights first): {e}"
        ) from e


def _from_pretrained(source: str, dtype: torch.dtype, class_name: str = "StableDiffusionPipeline",
                     **kwargs) -> DiffusionPipeline:
    cls, extra = PIPELINE_CLASSES[class_name]
    # The models read tensor by tensor in `dtype` (half the peak memory, see models.streamed);
    # from_pretrained loads whatever that left out. Components given in kwargs (None: skipped)
    # are not read at all.
    streamed = streamed_components(Path(source), dtype, skip=tuple(kwargs))
    return cls.from_pretrained(
        source,
        dtype=dtype,
        use_safetensors=True,  # never unpickle: .bin weights can run code when loaded
        **extra,
        **streamed,
        **kwargs,
    )


# --- Hugging Face hub -----------------------------------------------------------------------


def _for(class_name: str, skipped: dict | None) -> dict:
    """`skipped` (SD3's T5 parts) for an SD3 pipeline; other classes have no such components."""
    return dict(skipped or {}) if class_name == "StableDiffusion3Pipeline" else {}


def _load_hub(base: str, dtype: torch.dtype, skipped: dict | None = None) -> DiffusionPipeline:
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
            return _from_pretrained(str(Path(cached_index).parent), dtype, name,
                                    **_for(name, skipped))
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
        folder = cls.download(repo_id, cache_dir=cache, use_safetensors=True, **extra,
                              **_for(name, skipped))
        return _from_pretrained(str(folder), dtype, name, **_for(name, skipped))
    except Exception as e:
        raise BaseModelError(f"base {base!r}: downloading or loading it failed: {e}") from e


# --- inspection -----------------------------------------------------------------------------


