"""Community metadata (`ss_*`, `sshs_*`, `modelspec.*`) and the hashes A1111 and sd-scripts use.

Every value is a string (a safetensors requirement). The `ss_*` keys follow sd-scripts'
train_network.py (it writes `str(value)` of each argument), the `modelspec.*` keys the SAI Model
Spec as sd-scripts fills it (library/sai_model_spec.py).

Hashes are of the file as written (see `file_hashes`):
- `sshs_model_hash`: sha256 of the bytes after the safetensors header, what A1111 shows
  (sd-scripts `addnet_hash_safetensors`).
- `sshs_legacy_hash`: first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB
  (sd-scripts `addnet_hash_legacy`); for files under 1 MiB that is the hash of nothing.
- `modelspec.hash_sha256`: "0x" + the sha256 of the tensors' bytes concatenated in file order,
  which is sd-scripts' `precalculate_safetensors_hashes` and equals "0x" + `sshs_model_hash`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from sd_lora.formats.adapter_state import DORA_NORM_KEY, AdapterState

LYCORIS_NETWORK_MODULE = "lycoris.kohya"
NETWORK_MODULE = "networks.lora"
# sd-scripts' SD3 LoRA is a module of its own (its network reads the fused qkv and lora_te1/2)
NETWORK_MODULES = {"sd3": "networks.lora_sd3"}
IMPLEMENTATION = {
    "sd1": "diffusers",
    "sd2": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    # our SD3 kohya names are the original MMDiT's (formats.mmdit), Stability's own layout
    "sd3": "https://github.com/Stability-AI/generative-models",
}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3"}
# sd-scripts writes SD3's model type as the version: "5-medium", "5-large" or "medium" (SD3
# Medium), the suffix of its modelspec.architecture `stable-diffusion-3-<variant>`.
SD3_VARIANTS = ("5-medium", "5-large", "medium")
FAMILY_OF_BASE_MODEL_VERSION = {**{v: k for k, v in BASE_MODEL_VERSION.items()},
                                **{v: "sd3" for v in SD3_VARIANTS}}
# ours -> modelspec's. Rectified flow has no modelspec value (it names epsilon and v): SD3
# files leave the key out.
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v", "flow": None}
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
# Placeholders of the final lengths, so that filling the hashes in leaves the header size as is.
HASH_PLACEHOLDERS = {
    "sshs_model_hash": "0" * 64,
    "sshs_legacy_hash": "0" * 8,
    "modelspec.hash_sha256": "0x" + "0" * 64,
}


@dataclass(frozen=True)
class TrainingInfo:
    """What the trainer knows about a run; ranks and alphas come from the `AdapterState`."""

    name: str  # ss_output_name, modelspec.title
    family: str | None = None  # checked against the state's when given
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "flow" (SD3)
    variant: str | None = None  # SD3's: one of SD3_VARIANTS (ss_base_model_version)
    resolution: int | tuple[int, int] = 512  # training size, (width, height) or square side
    base_model: str | None = None  # ss_sd_model_name
    steps: int | None = None
    learning_rate: float | None = None
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    seed: int | None = None
    num_train_images: int | None = None
    num_reg_images: int | None = None  # regularization items per epoch (None: no regularization)
    # {dataset folder: {tag: count}}, as sd-scripts writes it and A1111 shows it
    tag_frequency: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    comment: str | None = None
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    network_args: Mapping[str, str] = field(default_factory=dict)
    min_snr_gamma: float | None = None  # ss_min_snr_gamma (None: unweighted loss)
    noise_offset: float | None = None  # ss_noise_offset
    prior_loss_weight: float | None = None  # ss_prior_loss_weight (with regularization images)
    # More sd-scripts recipe keys, already named: {"ss_lr_scheduler": "cosine", ...}
    recipe: Mapping[str, object] = field(default_factory=dict)
    started_at: float | None = None  # unix time
    finished_at: float | None = None  # unix time
    trigger_phrase: str | None = None
    description: str | None = None
    author: str | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"TrainingInfo.prediction_type {self.prediction_type!r} is not one of "
                f"{list(PREDICTION_TYPES)}"
            )
        for folder, tags in self.tag_frequency.items():
            if not isinstance(tags, Mapping):
                raise ValueError(
                    "TrainingInfo.tag_frequency maps dataset folder -> {tag: count}; "
                    f"got {type(tags).__name__} for {folder!r}"
                )

    def size(self) -> tuple[int, int]:
        if isinstance(self.resolution, int):
            return (self.resolution, self.resolution)
        width, height = self.resolution
        return (int(width), int(height))


def base_architecture(family: str, prediction_type: str, variant: str | None = None) -> str:
    """modelspec.architecture of a base model, as sd-scripts determines it."""
    if family == "sd3":
        return "stable-diffusion-3" + (f"-{variant}" if variant else "")
    if family == "sdxl":
        return "stable-diffusion-xl-v1-base"
    if family == "sd2":
        v = prediction_type == "v_prediction"
        return "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


def architecture(family: str, prediction_type: str, variant: str | None = None) -> str:
    """modelspec.architecture of a LoRA for this base."""
    return base_architecture(family, prediction_type, variant) + "/lora"


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def _network_keys(state: AdapterState) -> dict[str, str]:
    """ss_network_dim / ss_network_alpha: the most common rank and alpha over all modules.

    The per-module `.alpha` tensors stay authoritative; these keys are what UIs display.
    """
    modules = [m for comp in state.modules.values() for m in comp.values()]
    if not modules:
        raise ValueError("the adapter has no modules; there is nothing to save")
    kinds = state.kinds()
    for_comfyui = any(getattr(m, "norm_of", "") == "base" for m in modules)
    return {
        # which DoRA formula the magnitudes are for (adapter_state.DoraModule.norm_of)
        **({DORA_NORM_KEY: "base"} if for_comfyui else {}),
        # sd-scripts' own module for plain LoRA; LyCORIS' for LoHa/LoKr, as its files say
        "ss_network_module": (NETWORK_MODULES.get(state.family, NETWORK_MODULE)
                              if kinds == {"lora"} else LYCORIS_NETWORK_MODULE),
        "ss_network_dim": str(_most_common([m.r for m in modules])),
        "ss_network_alpha": str(float(_most_common([float(m.r if m.alpha is None else m.alpha)
                                                     for m in modules]))),
        "ss_base_model_version": BASE_MODEL_VERSION[state.family],
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": IMPLEMENTATION[state.family],
    }


def _training_keys(info: TrainingInfo, family: str) -> dict[str, object]:
    width, height = info.size()
    v = info.prediction_type == "v_prediction"
    finished = info.finished_at if info.finished_at is not None else time.time()
    return {
        "ss_output_name": info.name,
        "ss_sd_model_name": info.base_model,
        "ss_v2": family == "sd2",
        "ss_v_parameterization": v,
        "ss_resolution": (width, height),
        "ss_steps": info.steps,
        "ss_learning_rate": info.learning_rate,
        "ss_unet_lr": info.unet_lr,
        "ss_text_encoder_lr": info.text_encoder_lr,
        "ss_seed": info.seed,
        "ss_num_train_images": info.num_train_images,
        "ss_num_reg_images": info.num_reg_images,
        "ss_mixed_precision": info.mixed_precision,
        "ss_training_comment": info.comment,
        "ss_training_started_at": info.started_at,
        "ss_training_finished_at": finished,
        "ss_tag_frequency": json.dumps({k: dict(v) for k, v in info.tag_frequency.items()}),
        "ss_network_args": json.dumps(dict(info.network_args)),
        "ss_min_snr_gamma": info.min_snr_gamma,
        "ss_noise_offset": info.noise_offset,
        "ss_prior_loss_weight": info.prior_loss_weight,
        **dict(info.recipe),
        "modelspec.architecture": architecture(family, info.prediction_type, info.variant),
        **({"ss_base_model_version": info.variant} if info.variant else {}),
        "modelspec.title": info.name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": dt.datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.prediction_type": PREDICTION_TYPES[info.prediction_type],
        "modelspec.trigger_phrase": info.trigger_phrase,
        "modelspec.description": info.description,
        "modelspec.author": info.author,
    }


def build_metadata(state: AdapterState, info: TrainingInfo | None) -> dict[str, str]:
    """All community keys except the hashes (added by `adapter_io.save_adapter`); values are str.

    Without `info` only what the state itself tells is written (family, dims, alphas); for SD 1.x
    the architecture too, which does not depend on the prediction type.
    """
    metadata: dict[str, str] = _network_keys(state)
    if info is None:
        if state.family != "sd2":
            metadata["modelspec.architecture"] = architecture(state.family, "epsilon")
        return metadata
    if info.family is not None and info.family != state.family:
        raise ValueError(
            f"TrainingInfo.family {info.family!r} does not match the adapter's family "
            f"{state.family!r}"
        )
    for key, value in _training_keys(info, state.family).items():
        if value is not None:
            metadata[key] = str(value)
    return metadata


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The base family a file's metadata states, or None when it states none."""
    version = metadata.get("ss_base_model_version", "")
    if version in FAMILY_OF_BASE_MODEL_VERSION:
        return FAMILY_OF_BASE_MODEL_VERSION[version]
    arch = metadata.get("modelspec.architecture", "")
    for prefix, family in (
        ("stable-diffusion-3", "sd3"),
        ("stable-diffusion-xl", "sdxl"),
        ("stable-diffusion-v2", "sd2"),
        ("stable-diffusion-v1", "sd1"),
    ):
        if arch.startswith(prefix):
            return family
    if version.startswith("sdxl"):
        return "sdxl"
    return None


def _data_offset(blob: bytes) -> int:
    if len(blob) < 8:
        raise ValueError(f"{len(blob)} bytes is too short for a safetensors file")
    offset = 8 + int.from_bytes(blob[:8], "little")
    if offset > len(blob):
        raise ValueError(
            f"safetensors header length {offset - 8} overruns the {len(blob)}-byte file"
        )
    return offset


def file_hashes(blob: bytes) -> dict[str, str]:
    """The three hash keys of a safetensors file's bytes, as A1111 / sd-scripts compute them."""
    model_hash = hashlib.sha256(blob[_data_offset(blob) :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return {
        "sshs_model_hash": model_hash,
        "sshs_legacy_hash": legacy_hash,
        "modelspec.hash_sha256": "0x" + model_hash,
    }


def short_hash(state: AdapterState) -> str | None:
    """A1111's short LoRA hash (infotext `Lora hashes: "name: <hash>"`): the first 12 hex digits
    of the file's `sshs_model_hash`, which A1111 also takes from the metadata when present. None
    for a file that stores none; `file_hashes(path.read_bytes())` computes it from the bytes."""
    stored = state.metadata.get("sshs_model_hash")
    return stored[:12] if stored else None
