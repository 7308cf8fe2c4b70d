"""Save and load adapter files (.safetensors only), in the kohya or the diffusers layout.

`save_adapter` writes atomically, with the community metadata and hashes computed from the bytes
actually written. `load_adapter` detects the layout from the keys and resolves kohya names through
the target model's module paths (`pipeline_module_paths(pipe)`), or, without a model, through
those of the standard SD 1.x / 2.x, SDXL or SD3 / 3.5 architectures (`reference_module_paths`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sd_lora.errors import UserError
from sd_lora.formats import kohya, peft_diffusers
from sd_lora.formats.adapter_state import (
    COMPONENTS,
    CONTEXT_WIDTH_FAMILY,
    DORA_NORM_KEY,
    AdapterState,
    canonical_name,
)
from sd_lora.formats.metadata import (
    HASH_KEYS,
    HASH_PLACEHOLDERS,
    TrainingInfo,
    build_metadata,
    family_from_metadata,
    file_hashes,
)
from sd_lora.util import pickles
from sd_lora.util.atomic import write_bytes_atomically
from sd_lora.util.words import plural

FORMATS = ("kohya", "diffusers")
SAVE_DTYPES = (torch.float16, torch.float32, torch.bfloat16)
# Width of the cross-attention context, seen as attn2.to_k's input: tells the family of a file
# that states none.
logger = logging.getLogger(__name__)


class AdapterFileError(UserError):  # a ValueError too
    """An adapter file that cannot be read or written; the message names the file."""


def save_adapter(
    state: AdapterState,
    path: str | os.PathLike,
    *,
    format: str = "kohya",
    info: TrainingInfo | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write `state` to `path` (.safetensors) atomically; returns the path.

    Metadata: the `ss_*`/`modelspec.*` keys (from `info` when given, else the state's own
    community keys carried over), plus `sshs_model_hash`, `sshs_legacy_hash` and
    `modelspec.hash_sha256` of the final bytes.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise AdapterFileError(f"{path}: adapters are written as .safetensors only")
    if format not in FORMATS:
        raise AdapterFileError(f"{path}: unknown format {format!r}; use one of {FORMATS}")
    if dtype not in SAVE_DTYPES:
        raise AdapterFileError(f"{path}: dtype {dtype} is not one of {SAVE_DTYPES}")
    try:
        if format == "kohya":
            tensors, metadata = kohya.to_kohya(state, dtype), {}
        else:
            tensors, metadata = peft_diffusers.to_diffusers(state, dtype)
    except (kohya.KohyaKeyError, peft_diffusers.DiffusersKeyError) as e:
        raise AdapterFileError(f"{path}: {e}") from None
    if info is None:  # keep what a loaded file said about its training (a format conversion)
        metadata.update(
            {
                k: v
                for k, v in state.metadata.items()
                if k.startswith(("ss_", "modelspec.")) and k not in HASH_KEYS
            }
        )
    metadata.update(build_metadata(state, info))
    blob = _serialize_with_hashes(tensors, metadata)
    write_bytes_atomically(path, blob)
    return path


def _serialize_with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialize once with same-length placeholders, hash, then fill the hashes in.

    The header keeps its length, so the data offset and the bytes at 1 MiB do not move and the
    hashes hold for the final bytes; checked below rather than assumed.
    """
    draft = safetensors.torch.save(tensors, metadata={**metadata, **HASH_PLACEHOLDERS})
    hashes = file_hashes(draft)
    blob = safetensors.torch.save(tensors, metadata={**metadata, **hashes})
    if file_hashes(blob) != hashes:
        raise AdapterFileError("internal error: the hashes moved when filled into the header")
    return blob


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; refuses pickles; errors name the file."""
    path = Path(path)
    if pickles.is_pickle(path):
        raise AdapterFileError(str(pickles.refusal(path, "adapters")))
    if path.is_dir():
        raise AdapterFileError(f"{path} is a folder; name an adapter file in it (.safetensors)")
    if path.suffix.lower() != ".safetensors":
        raise AdapterFileError(f"{path}: only .safetensors adapters are read (and, when allowed, "
                               f"pickles: {', '.join(pickles.PICKLE_SUFFIXES)})")
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise AdapterFileError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); it may be "
            "truncated or not an adapter"
        ) from e
    return tensors, metadata


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(key, how many values) of the first tensor holding NaN or inf, in the file's order; None
    when all are finite. Such a tensor turns every image it touches black, silently."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = int(tensor.numel() - torch.isfinite(tensor).sum())
            if bad:
                return key, bad
    return None


def nonfinite_problem(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> str | None:
    """The sentence that refuses a file with NaN/inf values, naming it and its first bad tensor."""
    found = first_nonfinite(tensors)
    if found is None:
        return None
    key, bad = found
    return (f"{path}: tensor {key!r} holds {plural(bad, 'NaN/inf value')} of "
            f"{tensors[key].numel()}; the "
            "file is damaged (or was saved from a training run that diverged) and would render "
            "black images. Re-download it, or export it again from an earlier checkpoint")


def nonfinite_in_file(path: str | os.PathLike) -> str | None:
    """`nonfinite_problem` for a .safetensors file, read one tensor at a time. Cached by size
    and modification time: the app asks again on every change of its form."""
    stat = Path(path).stat()
    return _nonfinite_in_file(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _nonfinite_in_file(path: str, size: int, mtime_ns: int) -> str | None:
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            for key in f.keys():
                problem = nonfinite_problem({key: f.get_tensor(key)}, path)
                if problem is not None:
                    return problem
    except Exception as e:  # safetensors raises several types for damaged files
        return f"{path}: not a readable safetensors file ({type(e).__name__}: {e})"
    return None


def detect_format(keys, path: str | os.PathLike = "adapter") -> str:
    keys = list(keys)
    if kohya.is_kohya(keys):
        return "kohya"
    if peft_diffusers.is_diffusers(keys):
        return "diffusers"
    raise AdapterFileError(
        f"{path}: not a LoRA in the kohya (lora_unet_*/lora_te_*) or diffusers (unet.*.lora_A, "
        "transformer.*.lora_A) "
        f"layout; first keys: {sorted(keys)[:5]}"
    )


# Key prefixes only an SD3 MMDiT's LoRA has: the original names (sd-scripts, ComfyUI), diffusers
# names under kohya prefixes (OneTrainer; a UNet's transformer_blocks sit inside attentions_N),
# and the diffusers layout's component.
SD3_KEY_PREFIXES = ("lora_unet_joint_blocks_", "lora_unet_transformer_blocks_",
                    f"{kohya.TRANSFORMER_ALIAS}_", "transformer.")


def detect_family(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    """The family the metadata states, else the one the keys (SD3's MMDiT, SDXL's second
    text encoder) or the cross-attention width imply."""
    family = family_from_metadata(metadata)
    if family is not None:
        return family
    if any(k.startswith(SD3_KEY_PREFIXES) for k in tensors):
        return "sd3"
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in tensors):
        return "sdxl"
    for key, tensor in tensors.items():
        # the cross-attention key projection's input is the text encoder's width
        if key.endswith(("attn2_to_k.lora_down.weight", "attn2_to_k.hada_w1_b",
                         "attn2.to_k.lora_A.weight", "attn2.to_k.lora.down.weight",
                         "attn2.processor.to_k_lora.down.weight")):
            return CONTEXT_WIDTH_FAMILY.get(int(tensor.shape[1]))
    return None


def load_adapter(
    path: str | os.PathLike,
    module_paths: dict[str, list[str]] | None = None,
    family: str | None = None,
    allow_pickle: bool = False,
) -> AdapterState:
    """Read an adapter file of either layout; its metadata lands in `state.metadata`.

    `module_paths` (from `pipeline_module_paths(pipe)`) resolves kohya names against that model;
    without it the standard module paths of the file's family are used (`reference_module_paths`). `family` overrides what the file
    states. A `.pt`/`.ckpt` adapter is refused unless `allow_pickle` (see sd_lora.util.pickles).
    """
    tensors, metadata = read_tensors(path, allow_pickle)
    return adapter_from_tensors(tensors, metadata, module_paths, family, source=path)


def read_tensors(path: str | os.PathLike, allow_pickle: bool = False
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`read_safetensors`, or, when allowed, a pickle's tensors through the weights-only
    loader (a pickle carries no metadata)."""
    if allow_pickle and pickles.is_pickle(path):
        try:
            return pickles.load_tensors(path), {}
        except pickles.PickleRefused as e:
            raise AdapterFileError(str(e)) from None
    return read_safetensors(path)


def adapter_from_tensors(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    module_paths: dict[str, list[str]] | None = None,
    family: str | None = None,
    source: str | os.PathLike = "adapter",
    check_finite: bool = True,
) -> AdapterState:
    """`load_adapter` on tensors already read; errors name `source`. Refuses NaN/inf values
    unless `check_finite` is False (`inspect`, which describes the file and reports them)."""
    problem = nonfinite_problem(tensors, source) if check_finite else None
    if problem is not None:
        raise AdapterFileError(problem)
    layout = detect_format(tensors, source)
    family = family or detect_family(tensors, metadata)
    if family is None:
        raise AdapterFileError(
            f"{source}: the file does not state its base family (no ss_base_model_version or "
            "modelspec.architecture) and its shapes do not tell (no cross-attention to_k layer to "
            "measure); add ss_base_model_version to its metadata (e.g. 'sd_v1'), or, from Python, "
            "pass family='sd1'|'sd2'|'sdxl'|'sd3' to load_adapter"
        )
    try:
        if layout == "kohya":
            paths = module_paths if module_paths is not None else reference_module_paths(family)
            state = kohya.from_kohya(tensors, paths, family)
        else:
            state = peft_diffusers.from_diffusers(tensors, metadata, family)
    except (ValueError, NotImplementedError) as e:
        raise AdapterFileError(f"{source}: {e}") from e
    state.metadata = dict(metadata)
    if metadata.get(DORA_NORM_KEY) == "base":  # a file written for ComfyUI's DoRA formula
        for by_path in state.modules.values():
            for module in by_path.values():
                if module.kind == "dora" and module.on_output_axis(tuple(module.delta_shape())):
                    module.norm_of = "base"
    if state.unmatched:  # never a silent drop: say what was left out
        logger.warning("%s: %s", source, state.coverage())
    return state


def _layers(component: str, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear/Conv2d layers by canonical path; a PEFT-wrapped layer under the wrapper's name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {}
    for name, module in model.named_modules():
        inside_peft = ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name
        if isinstance(module, BaseTunerLayer) or (
            isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and not inside_peft
        ):
            layers[canonical_name(component, name)] = module
    return layers


def component_modules(pipe) -> dict[str, dict[str, torch.nn.Module]]:
    """Every Linear/Conv2d of the denoiser (unet or SD3's transformer) and text encoder(s), keyed
    by canonical path (`text_model.` kept)."""
    return {
        component: _layers(component, getattr(pipe, component))
        for component in COMPONENTS
        if getattr(pipe, component, None) is not None
    }


def pipeline_module_paths(pipe) -> dict[str, list[str]]:
    """Canonical module paths per component, for `load_adapter(..., module_paths=...)`."""
    return {component: list(m) for component, m in component_modules(pipe).items()}


# The SD 1.x / 2.x UNet block layout (module names depend on nothing else; SD 2.x's linear
# proj_in/proj_out keep the same names). Channels are tiny: the model is built on the meta device.
SD_UNET_LAYOUT = dict(
    kohya.LDM_UNET_LAYOUTS["sd1"],
    block_out_channels=(8, 16, 32, 32),  # the 1:2:4:4 ratios of SD, for the same conv_shortcuts
    norm_num_groups=8,
    attention_head_dim=1,
    cross_attention_dim=8,
)
# CLIP-L (SD 1.x) has 12 layers, OpenCLIP-H as diffusers loads it (SD 2.x) 23: 24 covers both.
SD_TEXT_LAYERS = 24
# SDXL base's block layout (its LDM names depend on it; see kohya.LDM_UNET_LAYOUTS) with its
# transformer depths, and its encoders' depths: CLIP-L 12 layers, OpenCLIP-bigG 32.
SDXL_UNET_LAYOUT = dict(
    kohya.LDM_UNET_LAYOUTS["sdxl"],
    block_out_channels=(8, 16, 32),  # SDXL's 1:2:4 ratios
    transformer_layers_per_block=(1, 2, 10),
    norm_num_groups=8,
    attention_head_dim=1,
    cross_attention_dim=8,
    use_linear_projection=True,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 8,
)
SDXL_TEXT_LAYERS = (12, 32)
# SD3 / SD3.5: the MMDiT's names come from the bundled transformer configs (block count,
# MMDiT-X blocks, QK norms); its encoders are CLIP-L (12 layers) and CLIP-G (32), both with
# their text projections. SD3.5 Large has 38 blocks, Medium 24 of which 0-12 hold a second
# attention (attn2): the reference is their union, so a file for either resolves (names only:
# a layer's row order follows its shape, see formats.mmdit.swaps_scale_shift).
SD3_CONFIGS = ("stable-diffusion-3.5-medium", "stable-diffusion-3.5-large")
SD3_TEXT_LAYERS = (12, 32)
# Widths shrunk to 8 on the meta device: module names depend on none of them.
SD3_TINY_WIDTHS = dict(attention_head_dim=8, num_attention_heads=1, caption_projection_dim=8,
                       joint_attention_dim=8, pooled_projection_dim=8, pos_embed_max_size=4,
                       sample_size=4)


def _meta_text_encoder(layers: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(num_hidden_layers=layers, hidden_size=8, intermediate_size=8,
                            num_attention_heads=1, projection_dim=8)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def sd3_reference_config() -> dict:
    """The SD3 transformer config whose module names cover SD3.5 Medium's and Large's (and
    SD3 Medium's, a subset): Large's block count, Medium's attn2 blocks, tiny widths."""
    from sd_lora.models.single_file import bundled_folder

    configs = [json.loads((bundled_folder(name) / "transformer" / "config.json").read_text())
               for name in SD3_CONFIGS]
    base = {k: v for k, v in configs[0].items() if not k.startswith("_")}
    return dict(base, **SD3_TINY_WIDTHS,
                num_layers=max(c["num_layers"] for c in configs),
                dual_attention_layers=tuple(sorted({i for c in configs
                                                    for i in c.get("dual_attention_layers", ())})))


def _reference_models(family: str) -> list[tuple[str, torch.nn.Module]]:
    """(component, model) of the standard architecture of `family`, built on the meta device."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if family == "sd3":
        return [("transformer", SD3Transformer2DModel(**sd3_reference_config())),
                ("text_encoder", _meta_text_encoder(SD3_TEXT_LAYERS[0], projection=True)),
                ("text_encoder_2", _meta_text_encoder(SD3_TEXT_LAYERS[1], projection=True))]
    if family == "sdxl":
        return [("unet", UNet2DConditionModel(**SDXL_UNET_LAYOUT)),
                ("text_encoder", _meta_text_encoder(SDXL_TEXT_LAYERS[0])),
                ("text_encoder_2", _meta_text_encoder(SDXL_TEXT_LAYERS[1]))]
    return [("unet", UNet2DConditionModel(**SD_UNET_LAYOUT)),
            ("text_encoder", _meta_text_encoder(SD_TEXT_LAYERS))]


@functools.cache
def _reference_paths(family: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    with torch.device("meta"):
        models = _reference_models(family)
    return tuple((component, tuple(_layers(component, model))) for component, model in models)


def reference_module_paths(family: str) -> dict[str, list[str]]:
    """Module paths of the standard SD 1.x/2.x, SDXL or SD3/3.5 architecture, for reading
    without a model."""
    if family not in kohya.KOHYA_FAMILIES:
        raise NotImplementedError(f"no reference module table for family {family!r}; "
                                  f"known: {kohya.KOHYA_FAMILIES}")
    return {component: list(paths) for component, paths in _reference_paths(family)}
