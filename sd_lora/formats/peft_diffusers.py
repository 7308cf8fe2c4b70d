"""The diffusers / PEFT layout that `pipe.load_lora_weights(path)` reads.

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   (r, in)
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight         (out, r)

Alpha is not a tensor in this layout: diffusers keeps each component's `LoraConfig` arguments as
JSON in the safetensors metadata key `lora_adapter_metadata`, flattened with the component as
prefix (`{"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": [...], ...}`). Without that
key diffusers uses alpha = r, so we always write it; per-module values that differ from the
component's most common one go into `rank_pattern` / `alpha_pattern`.

Text-encoder naming, measured with diffusers 0.42.1 + transformers 5: diffusers itself writes
keys without `text_model.` (transformers 5's CLIPTextModel has no such level), and its loader
strips `text_model.` from tensor keys when the model lacks it, but uses the metadata as is. So we
write tensor keys WITH `text_model.` (what files made under transformers 4 have, and what older
loaders need) and metadata module names WITHOUT it: PEFT matches `target_modules` and pattern keys
as name suffixes, so these match both `encoder.layers.0...` and `text_model.encoder.layers.0...`.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import torch

from sd_lora.formats.adapter_state import (
    COMPONENTS,
    TEXT_MODEL_LEVEL,
    AdapterState,
    DoraModule,
    LoraModule,
    canonical_name,
)

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
SUFFIX_PARTS = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B",  # PEFT's DoRA: row norms
                ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude"}
# The magnitude's key as PEFT saves it ends in `lora_magnitude_vector`, and diffusers' UNet loader
# (PEFT's set_peft_model_state_dict) adds the `.weight` back. Its text-encoder loader under
# transformers 5 does not: the magnitudes were reported "unexpected" and left at the base's row
# norms (diffusers 0.42.1, transformers 5.23). Written with `.weight`, both loaders take them.
MAGNITUDE_KEY_UNET, MAGNITUDE_KEY_TEXT = "lora_magnitude_vector", "lora_magnitude_vector.weight"


class DiffusersKeyError(ValueError):
    """A diffusers-layout key or metadata entry that cannot be read; the message names it."""


# The layouts diffusers' training scripts wrote before PEFT (0.14-0.21), and what each piece is
# called now. Attention processors: `...attn1.processor.to_q_lora.down.weight`, UNet keys
# without a component prefix in the oldest files; LoRACompatibleLinear: `...to_q.lora.down.weight`
# and, in the text encoder, `...q_proj.lora_linear_layer.up.weight`. None of them stores alpha:
# diffusers applied them at alpha = r, and so do we.
LEGACY_PIECES = (
    (".processor.", "."),
    ("to_out_lora.", "to_out.0.lora."),
    *((f"to_{p}_lora.", f"to_{p}.lora.") for p in "qkv"),
    (".lora_linear_layer.down.weight", ".lora_A.weight"),
    (".lora_linear_layer.up.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora_B.weight"),
)
UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")


def is_legacy(keys) -> bool:
    return any(".lora.down.weight" in k or ".lora_linear_layer." in k or "_lora.down.weight" in k
               for k in keys)


def modern_key(key: str) -> str:
    """A pre-PEFT diffusers key in today's layout (other keys unchanged)."""
    for old, new in LEGACY_PIECES:
        key = key.replace(old, new)
    return "unet." + key if key.startswith(UNET_BLOCKS) else key


def is_diffusers(keys) -> bool:
    keys = list(keys)
    if is_legacy(keys):
        return True
    return any(k.startswith(tuple(f"{c}." for c in COMPONENTS)) and ".lora_" in k for k in keys)


def _most_common(values: dict[str, float]) -> float:
    return Counter(values.values()).most_common(1)[0][0]


def _config_name(component: str, path: str) -> str:
    """Module name as written in the LoRA config (no `text_model.`; see module docstring)."""
    return path.removeprefix(TEXT_MODEL_LEVEL) if component.startswith("text_encoder") else path


def component_config(component: str, modules: dict[str, LoraModule]) -> dict:
    """The `LoraConfig` arguments that reproduce each module's rank and alpha."""
    ranks = {_config_name(component, p): m.r for p, m in modules.items()}
    alphas = {_config_name(component, p): float(m.alpha) for p, m in modules.items()}
    r, alpha = _most_common(ranks), _most_common(alphas)
    return {
        "r": int(r),
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {name: v for name, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {name: v for name, v in sorted(alphas.items()) if v != alpha},
    }


LYCORIS_NAMES = {"loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}


def to_diffusers(
    state: AdapterState, dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) in the layout `load_lora_weights` reads, alpha kept."""
    other = sorted(state.kinds() - {"lora", "dora"})
    if other:
        raise DiffusersKeyError(
            f"the adapter holds {' and '.join(LYCORIS_NAMES[k] for k in other)} "
            "modules, which the diffusers/PEFT LoRA layout cannot hold; keep the kohya layout"
            + ", or turn it into a plain LoRA first (sd-lora resize IN --rank R --out OUT)"
        )
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, object] = {}
    for component, modules in state.modules.items():
        dora = _check_dora(component, modules)
        for path, module in modules.items():
            name = f"{component}.{canonical_name(component, path)}"
            lora = module.inner if dora else module
            tensors[f"{name}.lora_A.weight"] = lora.lora_A.to(dtype).contiguous()
            tensors[f"{name}.lora_B.weight"] = lora.lora_B.to(dtype).contiguous()
            if dora:
                key = MAGNITUDE_KEY_UNET if component == "unet" else MAGNITUDE_KEY_TEXT
                magnitude = module.dora_scale.flatten()
                if lora.lora_A.dim() == 4:  # PEFT's conv DoRA keeps (1, out, 1, 1)
                    magnitude = magnitude.reshape(1, -1, 1, 1)
                tensors[f"{name}.{key}"] = magnitude.to(dtype).contiguous()
        inner = {p: (m.inner if dora else m) for p, m in modules.items()}
        for key, value in component_config(component, inner).items():
            config[f"{component}.{key}"] = value
        if dora:
            config[f"{component}.use_dora"] = True
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return tensors, metadata


def _check_dora(component: str, modules: dict) -> bool:
    """Whether the component's modules are PEFT DoRA: PEFT's `use_dora` covers a whole
    component, and its magnitudes are per output row, so a mix, or LyCORIS' per-column
    magnitudes, or DoRA on LoHa/LoKr, cannot be written in this layout."""
    kinds = {m.kind for m in modules.values()}
    if "dora" not in kinds:
        return False
    if kinds != {"dora"}:
        raise DiffusersKeyError(f"{component} mixes DoRA and plain modules, which PEFT's "
                                "use_dora (one per component) cannot hold; keep the kohya layout")
    for path, module in modules.items():
        if module.norm_of == "base":
            raise DiffusersKeyError(
                f"{component}.{path}: this DoRA file is written for ComfyUI's formula (its "
                "magnitudes depend on the base weights); convert the standard kohya file of the "
                "run (without -comfyui) instead")
        if module.inner.kind != "lora" or not module.on_output_axis(tuple(module.delta_shape())):
            raise DiffusersKeyError(
                f"{component}.{path}: DoRA with per-input-column magnitudes (LyCORIS' default) or on "
                "a LoHa/LoKr module; PEFT's DoRA holds only per-output-row magnitudes on LoRA. "
                "Keep the kohya layout")
    return True


def _pattern_value(patterns: dict, name: str):
    """PEFT's rule (`peft.utils.other.get_pattern_key`): a key matches a module-name suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _alpha_for(config: dict, component: str, path: str, r: int) -> float:
    """Alpha of one module from the component's config; alpha = r when the file has none."""
    if not config:
        return float(r)
    if "lora_alpha" not in config:
        raise DiffusersKeyError(f"{METADATA_KEY} for {component} has no lora_alpha: {config}")
    name = _config_name(component, path)
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name)
    return float(config["lora_alpha"] if alpha is None else alpha)


def _split_configs(metadata: dict[str, str] | None) -> dict[str, dict]:
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DiffusersKeyError(f"{METADATA_KEY} is not valid JSON: {e}") from e
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _split_key(key: str) -> tuple[str, str, str]:
    component, _, rest = key.partition(".")
    for suffix, part in SUFFIX_PARTS.items():
        if component in COMPONENTS and rest.endswith(suffix):
            return component, rest[: -len(suffix)], part
    raise DiffusersKeyError(
        f"{key!r} is not a diffusers LoRA key (expected <component>.<module>.lora_A.weight or "
        f".lora_B.weight with component one of {COMPONENTS})"
    )


def from_diffusers(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, family: str
) -> AdapterState:
    """Inverse of `to_diffusers`; tensors come back as float32, text-encoder paths canonical."""
    configs = _split_configs(metadata)
    if is_legacy(tensors):
        tensors = {modern_key(k): v for k, v in tensors.items()}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, path, part = _split_key(key)
        parts.setdefault((component, canonical_name(component, path)), {})[part] = tensor
    missing = [f"{c}.{p}" for (c, p), v in parts.items() if not {"lora_A", "lora_B"} <= set(v)]
    if missing:
        raise DiffusersKeyError(f"modules without both lora_A and lora_B: {sorted(missing)[:5]}")
    modules: dict[str, dict] = {}
    for (component, path), pair in parts.items():
        down = pair["lora_A"].float()
        alpha = _alpha_for(configs.get(component, {}), component, path, down.shape[0])
        module = LoraModule(lora_A=down, lora_B=pair["lora_B"].float(), alpha=alpha)
        if "magnitude" in pair:  # PEFT DoRA: one magnitude per output row
            rows = pair["magnitude"].float()
            # (out,), or a conv's (1, out, 1, 1) as PEFT holds it: (out, 1, ...) either way
            module = DoraModule(module, rows.reshape(-1, *[1] * (down.dim() - 1)))
        modules.setdefault(component, {})[path] = module
    return AdapterState(family=family, modules=modules)
