"""Load an A1111/LDM single-file `.safetensors` checkpoint (SD 1.x, 2.x, SDXL) with no network access.
SD3 / SD3.5 files (`model.diffusion_model.joint_blocks.*`) go to `single_file_sd3`.

The diffusers config comes from, in order, whichever first matches the file's tensors exactly:
1. the configs that `save_single_file` stored in the file's metadata (`sd_lora.configs`);
2. the bundled config of the family (`assets/configs/`: SD 1.5, SD 2.1 768-v, SD 2.1-base);
3. a config inferred from the header shapes, with SD conventions for what shapes cannot tell
   (32 GroupNorm groups; 8 heads in SD 1 UNets, 64-channel heads in SD 2 UNets and in text
   encoders; the family's activation and VAE scaling). Not for SDXL: its fine-tunes keep SDXL
   base's architecture, so a file that matches neither is refused with the differences.
The chosen config is then handed to `StableDiffusionPipeline.from_single_file` (or the SDXL
pipeline's) with our CLIP tokenizers, so diffusers never looks anything up on the hub.

SD 2 weights do not say whether the model predicts noise or velocity. The choice is, in order:
the `prediction_type` argument, the file's metadata (ours, or `modelspec.prediction_type` /
`modelspec.architecture`), else v_prediction (the SD 2.x 768-v models, as diffusers and A1111
assume) with a warning saying how to choose epsilon for 512 "-base" models. SDXL defaults to
epsilon (SDXL base; the few v-prediction fine-tunes say so in their modelspec metadata, or pass
prediction_type).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from sd_lora.errors import UserError
from sd_lora.formats.ldm_checkpoint import CONFIGS_METADATA_KEY, components_to_ldm
from sd_lora.formats.metadata import IMPLEMENTATION, base_architecture
from sd_lora.models.bases import BaseModelError
from sd_lora.models.families import model_family, model_variant
from sd_lora.models.single_file_header import (
    Header,
    HeaderError,
    detect_family,
    expected_shapes,
    infer_text_encoder_fields,
    infer_unet_fields,
    infer_vae_fields,
    read_header,
    shape_mismatches,
)
from sd_lora.models.single_file_sd3 import (
    load_sd3_single_file,
    sd3_configs_metadata,
    sd3_tensors,
)
from sd_lora.models.tokenizers import clip_tokenizer, open_clip_tokenizer
from sd_lora.util.atomic import atomic_path

logger = logging.getLogger(__name__)

BUNDLED = {
    ("sd1", "epsilon"): "stable-diffusion-v1-5",
    ("sd1", "v_prediction"): "stable-diffusion-v1-5",
    ("sd2", "v_prediction"): "stable-diffusion-2-1",
    ("sd2", "epsilon"): "stable-diffusion-2-1-base",
    ("sdxl", "epsilon"): "stable-diffusion-xl-base-1.0",
    ("sdxl", "v_prediction"): "stable-diffusion-xl-base-1.0",
}
TEXT_ENCODERS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",),
                 "sdxl": ("text_encoder", "text_encoder_2")}
HEAD_WIDTH = 64  # channels per head: SD 2 UNets, CLIP ViT-L and OpenCLIP ViT-H text encoders
SD1_UNET_HEADS = 8


@dataclass(frozen=True)
class PipelineConfigs:
    """Diffusers configs for one checkpoint, and where they came from."""

    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict
    model_index: dict
    source: str
    folder: Path | None = None  # a bundled folder usable as is
    text_encoder_2: dict | None = None  # SDXL


def bundled_folder(name: str) -> Path:
    return Path(str(resources.files("sd_lora") / "assets" / "configs" / name))


def bundled_configs(name: str) -> PipelineConfigs:
    folder = bundled_folder(name)

    def read(rel: str) -> dict:
        return json.loads((folder / rel).read_text())

    second = folder / "text_encoder_2" / "config.json"
    return PipelineConfigs(
        unet=read("unet/config.json"),
        vae=read("vae/config.json"),
        text_encoder=read("text_encoder/config.json"),
        scheduler=read("scheduler/scheduler_config.json"),
        model_index=read("model_index.json"),
        source=f"bundled config {name}",
        folder=folder,
        text_encoder_2=json.loads(second.read_text()) if second.is_file() else None,
    )


def metadata_configs(header: Header, base: PipelineConfigs) -> PipelineConfigs | None:
    stored = header.configs_metadata()
    if not stored:
        return None
    index = dict(base.model_index, scheduler=["diffusers", stored["scheduler"]["_class_name"]])
    return PipelineConfigs(
        stored["unet"],
        stored["vae"],
        stored["text_encoder"],
        stored["scheduler"],
        index,
        source="configs stored in the file's metadata",
        text_encoder_2=stored.get("text_encoder_2"),
    )


def _heads(widths: list[int], head_width: int, what: str) -> list[int]:
    if any(w % head_width for w in widths):
        raise HeaderError(
            f"cannot tell the {what} attention heads: widths {widths} are not multiples of "
            f"{head_width} channels a head"
        )
    return [w // head_width for w in widths]


def inferred_configs(header: Header, family: str, base: PipelineConfigs) -> PipelineConfigs:
    """The family's config with every field the header determines replaced by the header's."""
    if family == "sdxl":
        raise HeaderError("its shapes differ from SDXL base's, and other SDXL architectures "
                          "are not inferred from shapes")
    unet = dict(base.unet, **infer_unet_fields(header.shapes))
    widths = list(unet["block_out_channels"])
    if family == "sd1":  # SD 1 fixes the number of heads (diffusers' legacy `attention_head_dim`)
        if any(w % SD1_UNET_HEADS for w in widths):
            raise HeaderError(f"cannot split UNet widths {widths} into {SD1_UNET_HEADS} heads")
        unet["attention_head_dim"] = SD1_UNET_HEADS
    else:  # SD 2 fixes the width of a head
        unet["attention_head_dim"] = _heads(widths, HEAD_WIDTH, "UNet")
    vae = dict(base.vae, **infer_vae_fields(header.shapes))
    text = dict(base.text_encoder, **infer_text_encoder_fields(header.shapes, family))
    text["num_attention_heads"] = _heads([text["hidden_size"]], HEAD_WIDTH, "text-encoder")[0]
    return replace(
        base,
        unet=unet,
        vae=vae,
        text_encoder=text,
        folder=None,
        source="config inferred from the tensor shapes",
    )


def choose_configs(header: Header, family: str, prediction_type: str) -> PipelineConfigs:
    """The first candidate whose expected tensors match the file exactly (see module doc)."""
    base = bundled_configs(BUNDLED[(family, prediction_type)])
    candidates = [c for c in (metadata_configs(header, base), base) if c is not None]
    rejected = []
    for candidate in candidates:
        problems = _problems(header, candidate, family)
        if not problems:
            return candidate
        rejected.append(f"{candidate.source}: {len(problems)} differences, e.g. {problems[:3]}")
        logger.info("%s: %s does not fit (%s)", header.path, candidate.source, problems[:3])
    try:
        inferred = inferred_configs(header, family, base)
        problems = _problems(header, inferred, family)
    except HeaderError as e:
        problems = [str(e)]
    if not problems:
        return inferred
    rejected.append(f"inferred config: {problems[:5]}")
    raise HeaderError("no config fits its tensors. " + "; ".join(rejected))


def _problems(header: Header, configs: PipelineConfigs, family: str) -> list[str]:
    try:
        expected = expected_shapes(configs.unet, configs.vae, configs.text_encoder, family,
                                   configs.text_encoder_2)
    except Exception as e:  # a config diffusers/transformers cannot build (e.g. bad head count)
        return [f"cannot build the models: {e}"]
    return shape_mismatches(header, expected)


def resolve_prediction_type(header: Header, family: str, requested: str | None) -> tuple[str, str]:
    """(prediction type, why) following the order in the module doc."""
    if requested is not None:
        return requested, "the prediction_type argument"
    stored = header.configs_metadata()
    if stored and "prediction_type" in stored.get("scheduler", {}):
        return stored["scheduler"]["prediction_type"], "the file's stored scheduler config"
    spec = header.metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", "the file's modelspec.prediction_type"
    if spec == "epsilon":
        return "epsilon", "the file's modelspec.prediction_type"
    if header.metadata.get("modelspec.architecture", "").endswith("-v"):
        return "v_prediction", "the file's modelspec.architecture"
    if family in ("sd1", "sdxl"):
        return "epsilon", f"the {'SD 1.x' if family == 'sd1' else 'SDXL'} default"
    logger.warning(
        "%s: SD 2.x weights do not say whether the model predicts noise or velocity; assuming "
        "v_prediction (the 768-v models). For a 512 '-base' model pass prediction_type='epsilon'.",
        header.path,
    )
    return "v_prediction", "the SD 2.x default (768-v)"


def _write_folder(configs: PipelineConfigs, root: Path) -> Path:
    files = {
        "model_index.json": configs.model_index,
        "unet/config.json": configs.unet,
        "vae/config.json": configs.vae,
        "text_encoder/config.json": configs.text_encoder,
        "scheduler/scheduler_config.json": configs.scheduler,
    }
    if configs.text_encoder_2 is not None:
        files["text_encoder_2/config.json"] = configs.text_encoder_2
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data, indent=2))
    return root


def load_single_file(
    path: Path, dtype: torch.dtype, prediction_type: str | None, load_t5: bool = True
) -> StableDiffusionPipeline:
    """Load an SD 1.x/2.x/SDXL LDM `.safetensors` checkpoint, or an SD3 one (without reading
    its T5 unless `load_t5`); raises BaseModelError naming the file."""
    try:
        header = read_header(path)
    except Exception as e:
        raise BaseModelError(f"{path} is not a readable .safetensors file: {e}") from e
    try:
        family = detect_family(header)
    except HeaderError as e:
        raise BaseModelError(f"cannot load {path} as a base model: {e}") from e
    if family == "sd3":  # rectified flow: load_pipeline refuses a prediction_type for it
        return load_sd3_single_file(header, dtype, load_t5)
    try:
        prediction, why = resolve_prediction_type(header, family, prediction_type)
        configs = choose_configs(header, family, prediction)
    except HeaderError as e:
        raise BaseModelError(f"cannot load {path} as a base model: {e}") from e
    in_channels = configs.unet.get("in_channels", 4)
    if in_channels != 4:
        raise BaseModelError(
            f"{path}: its UNet takes {in_channels} input channels (an inpainting or edit model); "
            "train on a text-to-image base with 4 latent channels"
        )
    logger.info(
        "%s: %s, %s, prediction type %s from %s", path, family, configs.source, prediction, why
    )
    with tempfile.TemporaryDirectory(prefix="sd_lora_config_") as tmp:
        folder = configs.folder or _write_folder(configs, Path(tmp))
        try:
            pipe = _from_single_file(path, folder, family, dtype)
        except Exception as e:  # our shape check passed, so this is unexpected: keep the cause
            raise BaseModelError(f"diffusers could not load {path} ({configs.source}): {e}") from e
    _check_loaded(pipe, path, family)
    if pipe.scheduler.config.get("prediction_type", "epsilon") != prediction:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=prediction
        )
    return pipe


def _from_single_file(path: Path, folder: Path, family: str, dtype: torch.dtype):
    """diffusers' loader, kept offline: local config folder, our tokenizers, no safety checker."""
    if family == "sdxl":
        return StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(folder), tokenizer=clip_tokenizer(),
            tokenizer_2=open_clip_tokenizer(), add_watermarker=False, local_files_only=True,
            dtype=dtype,
        )
    tokenizer = open_clip_tokenizer() if family == "sd2" else clip_tokenizer()
    return StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(folder),
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
        dtype=dtype,
    )


def _check_loaded(pipe, path: Path, family: str) -> None:
    """diffusers leaves weights it did not find on the meta device, silently; refuse that."""
    for name in ("unet", "vae", *TEXT_ENCODERS[family]):
        missing = [n for n, p in getattr(pipe, name).named_parameters() if p.is_meta]
        if missing:
            raise BaseModelError(f"{path}: the {name} weights {missing[:3]} were not in the file")


# --- writing: the reverse of load_single_file --------------------------------------------------------------------------------

def pipeline_metadata(pipe, family: str, title: str, text_encoders: bool = True) -> dict[str, str]:
    """safetensors metadata: SAI model-spec keys plus the exact diffusers configs (ours)."""
    if family == "sd3":
        configs = sd3_configs_metadata(pipe, text_encoders)
        denoiser, prediction = pipe.transformer, None  # rectified flow: modelspec has no name
    else:
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        scheduler = dict(pipe.scheduler.config)
        scheduler["_class_name"] = type(pipe.scheduler).__name__
        configs = {
            "unet": dict(pipe.unet.config),
            "vae": dict(pipe.vae.config),
            "text_encoder": pipe.text_encoder.config.to_dict(),
            "scheduler": scheduler,
        }
        if getattr(pipe, "text_encoder_2", None) is not None:
            configs["text_encoder_2"] = pipe.text_encoder_2.config.to_dict()
        denoiser = pipe.unet
    latent = denoiser.config.sample_size
    latent = latent if isinstance(latent, int) else max(latent)
    side = latent * 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # VAE halves per level
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": base_architecture(family, prediction or "flow", model_variant(pipe)),
        # what sd-scripts writes: "diffusers" for SD 1.x / 2.x, Stability's repository for SDXL
        "modelspec.implementation": IMPLEMENTATION[family],
        "modelspec.title": title,
        "modelspec.resolution": f"{side}x{side}",
        CONFIGS_METADATA_KEY: json.dumps(configs, default=list),
    }
    if prediction is not None:
        metadata["modelspec.prediction_type"] = "v" if prediction == "v_prediction" else "epsilon"
    return metadata


def save_single_file(pipe, path: str | os.PathLike, dtype: torch.dtype,
                     text_encoders: bool = True) -> Path:
    """Write `pipe` (SD 1.x, 2.x, SDXL or SD3) as one LDM / original-layout `.safetensors` file
    in `dtype`, atomically. `text_encoders=False` leaves them out, as SD3 base files do (SD3
    only: the other families' loaders need them in the file)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: single-file checkpoints are written as .safetensors only")
    family = model_family(pipe)
    if family == "sd3":
        tensors = sd3_tensors(pipe, text_encoders)
    elif not text_encoders:
        raise UserError(f"a {family} checkpoint must hold its text encoders; only SD3 files "
                        "may leave them out")
    else:
        tensors = components_to_ldm(pipe.unet, pipe.vae, pipe.text_encoder, family,
                                    getattr(pipe, "text_encoder_2", None))
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    metadata = pipeline_metadata(pipe, family, title=path.stem, text_encoders=text_encoders)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
