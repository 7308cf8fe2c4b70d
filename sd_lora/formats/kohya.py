"""The kohya / sd-scripts LoRA layout that A1111, ComfyUI, InvokeAI and sd-scripts read.

One adapted layer is three tensors under one underscore name:

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (r, in)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    (out, r)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             0-dim

The name is the component's prefix plus the module path with `.` replaced by `_`. For SD 1.x/2.x
the UNet path is the diffusers one and the text encoder's keeps its `text_model.` level
(`lora_te_text_model_encoder_layers_0_self_attn_q_proj`), which is what sd-scripts writes.

`.alpha` holds the real alpha (the delta is `alpha / r * up @ down`). A file without `.alpha`
keys means alpha = r (scale 1), the convention of sd-scripts and every loader.

Underscore names are ambiguous (`to_out_0` could be `to.out.0`), so reading resolves them through
a lookup table built from the target model's own module paths; a name that maps to nothing is an
error naming it, never a silent skip.

diffusers 0.42.1 reading these files (`load_lora_weights`), measured: it applies one alpha per
component (the most common) because it mangles the names of per-module alphas, and it drops
text-encoder q/k/v LoRA unless `out_proj` is adapted too (it detects the layout by `to_out_lora`).
A1111 and ComfyUI read `.alpha` per module. Per-module alphas survive diffusers in the diffusers
layout (`peft_diffusers`).

SDXL: sd-scripts writes UNet names in LDM form (`lora_unet_input_blocks_4_1_transformer_blocks_0_
attn1_to_q`, from the diffusers path `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`)
through the table of `sd_lora.formats.ldm_checkpoint.unet_module_table`, and `lora_te1_` /
`lora_te2_` for the two text encoders. Files with diffusers UNet names for SDXL exist too (older
trainers, diffusers' own converter), and SD 1.x/2.x files with LDM UNet names (some older
tools); both are read, never written.

SD3 / SD3.5 (as sd-scripts writes and ComfyUI reads): the MMDiT under `lora_unet_` with its
original module names (`lora_unet_joint_blocks_0_x_block_attn_qkv`, from diffusers'
`transformer_blocks.0.attn.to_q`, `to_k` and `to_v` fused into one LoRA), CLIP-L and CLIP-G under
`lora_te1_` / `lora_te2_`; see `sd_lora.formats.mmdit`. Files with diffusers transformer names under
`lora_unet_` or `lora_transformer_` (OneTrainer; ComfyUI reads them) are read, never written.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from sd_lora.formats import mmdit
from sd_lora.formats.adapter_state import (
    CONTEXT_WIDTH_FAMILY,
    FAMILY_NAMES,
    TEXT_MODEL_LEVEL,
    AdapterState,
    DoraModule,
    LohaModule,
    LokrModule,
    LoraModule,
    canonical_name,
)
from sd_lora.formats.ldm_checkpoint import UnmappedKeyError, map_module_name, unet_module_table
from sd_lora.util.words import plural

# The prefix written for each component, per base family.
WRITE_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sd2": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "sd3": {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
# Extra prefixes accepted on read, never written. diffusers' `convert_state_dict_to_kohya` writes
# `lora_te1_` for SD 1.x, which sd-scripts and InvokeAI ignore.
READ_ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "sd1": {"text_encoder": ("lora_te1",)},
    "sd2": {"text_encoder": ("lora_te1",)},
    "sdxl": {},
    "sd3": {},
}
# The families kohya files are written and read for: the UNet ones, and SD3's MMDiT.
UNET_FAMILIES = ("sd1", "sd2", "sdxl")
KOHYA_FAMILIES = (*UNET_FAMILIES, "sd3")
# Diffusers-named SD3 transformer modules are also read under this prefix (OneTrainer's).
TRANSFORMER_ALIAS = "lora_transformer"
# The UNet block layout each family's LDM module names follow: every SD 1.x/2.x UNet has SD's
# four levels, every SDXL UNet (base 1.0 and its fine-tunes) SDXL base's three; the names depend
# on nothing else (transformer depth only adds transformer_blocks_N).
SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
)
LDM_UNET_LAYOUTS: dict[str, dict] = {
    "sd1": SD_BLOCKS,
    "sd2": SD_BLOCKS,
    "sdxl": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        addition_embed_type="text_time",
    ),
}
# sd-scripts writes LDM UNet names for SDXL only; SD 1.x/2.x files with LDM names (some older
# tools) are read, never written.
WRITES_LDM_UNET = ("sdxl",)


# Model-free parsing: which component a prefix belongs to, longest prefix first.
PREFIX_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("lora_transformer_", "transformer"),
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)
# Tensor-name suffixes and the part of the LoRA each holds.
SUFFIX_KINDS: dict[str, str] = {
    ".lora_down.weight": "lora_down",
    ".lora_up.weight": "lora_up",
    ".alpha": "alpha",
    # LyCORIS, in the same files (A1111, ComfyUI and sd-scripts read them alike)
    **{f".{part}": part for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                                     "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
                                     "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                                     "dora_scale")},
}
# A file may name a few modules the base lacks (A1111 and ComfyUI skip them silently); past this
# share the file is for another model, and reading it would do almost nothing.
MAX_UNMATCHED = 0.1
# Parts beside a module's own tensors: its alpha, and DoRA's magnitudes.
SHARED_PARTS = ("alpha", "dora_scale")


class KohyaKeyError(ValueError):
    """A kohya key that cannot be parsed or resolved; the message names the keys."""


class KohyaKey(NamedTuple):
    component: str  # unet | text_encoder | text_encoder_2
    module: str  # the kohya module name, e.g. lora_te_text_model_encoder_layers_0_mlp_fc1
    kind: str  # lora_down | lora_up | alpha


def _check_family(family: str, action: str) -> None:
    if family not in KOHYA_FAMILIES:
        raise KohyaKeyError(
            f"{action} kohya files for family {family!r}: unknown; use one of {KOHYA_FAMILIES}"
        )


def kohya_module_name(prefix: str, module_path: str) -> str:
    """Prefix + path with dots as underscores: `lora_unet` + `a.b_c.0` -> `lora_unet_a_b_c_0`.

    Not invertible by itself (`b_c` vs `b.c`): reading goes through `lookup_table`.
    """
    return f"{prefix}_{module_path.replace('.', '_')}"


@functools.cache
def _ldm_table(family: str) -> dict[str, str]:
    return unet_module_table(LDM_UNET_LAYOUTS[family])


def written_path(family: str, component: str, path: str) -> str:
    """The module path a kohya file spells: LDM for an SDXL UNet, the original MMDiT name for an
    SD3 transformer (one fused qkv for to_q, to_k and to_v), else the canonical path."""
    if component == "transformer" and family == "sd3":
        try:
            return mmdit.original_name(path).path
        except mmdit.MmditKeyError as e:
            raise KohyaKeyError(str(e)) from None
    if component == "unet" and family in WRITES_LDM_UNET:
        try:
            return map_module_name(path, _ldm_table(family))
        except UnmappedKeyError:
            raise KohyaKeyError(
                f"UNet module {path!r} has no LDM name in the {family} layout (is the base an "
                f"{FAMILY_NAMES[family]} UNet?)"
            ) from None
    return canonical_name(component, path)


def to_kohya(state: AdapterState, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Kohya tensors of `state`: lora_down/lora_up in `dtype`, `.alpha` the real alpha in fp32."""
    _check_family(state.family, "writing")
    prefixes = WRITE_PREFIXES[state.family]
    tensors: dict[str, torch.Tensor] = {}
    for component, modules in state.modules.items():
        if component not in prefixes:
            raise KohyaKeyError(f"{state.family} has no kohya prefix for component {component!r}")
        for path, module in _written_modules(state.family, component, modules).items():
            name = kohya_module_name(prefixes[component], path)
            tensors.update(module_tensors(name, module, dtype))
    return tensors


def _written_modules(family: str, component: str, modules: dict) -> dict:
    """{path as the file spells it: module}; an SD3 transformer's q/k/v fused into one module."""
    if component == "transformer" and family == "sd3":
        try:
            return mmdit.to_original_modules(modules)
        except mmdit.MmditKeyError as e:
            raise KohyaKeyError(str(e)) from None
    return {written_path(family, component, path): module for path, module in modules.items()}


def parse_kohya_key(key: str) -> KohyaKey:
    """Split a kohya tensor name into (component, module name, kind) without a model."""
    suffix = next((s for s in SUFFIX_KINDS if key.endswith(s)), None)
    if suffix is None:
        raise KohyaKeyError(
            f"{key!r} is not a LoRA, LoHa or LoKr tensor (expected a name ending in one of "
            f"{list(SUFFIX_KINDS)})"
        )
    module = key[: -len(suffix)]
    for prefix, component in PREFIX_COMPONENTS:
        if module.startswith(prefix):
            return KohyaKey(component, module, SUFFIX_KINDS[suffix])
    raise KohyaKeyError(
        f"{key!r} has no known kohya prefix; expected one of {[p for p, _ in PREFIX_COMPONENTS]}"
    )


def is_kohya(keys) -> bool:
    return any(k.startswith(tuple(p for p, _ in PREFIX_COMPONENTS)) for k in keys)


def lookup_table(module_paths: dict[str, list[str]], family: str) -> dict[str, tuple[str, str]]:
    """kohya module name -> (component, canonical module path), aliases included. An SD3
    transformer's original MMDiT spelling maps to (component, original path): `_read_modules`
    turns it into diffusers paths (a fused qkv into three)."""
    table: dict[str, tuple[str, str]] = {}
    prefixes = WRITE_PREFIXES[family]
    for component, paths in module_paths.items():
        if component not in prefixes:
            raise KohyaKeyError(
                f"the target model has a {component!r}, which {FAMILY_NAMES[family]} models do "
                f"not (they have {sorted(prefixes)}): the file is {FAMILY_NAMES[family]}'s and "
                "the model another family's; load the adapter onto a base of its family")
        if component == "transformer" and family == "sd3":
            entries = _mmdit_entries(prefixes[component], paths)
        else:
            entries = _entries(family, component, paths)
        for name, target in entries:
            other = table.setdefault(name, target)
            if other != target:
                raise KohyaKeyError(
                    f"kohya name {name!r} is ambiguous: it is both {other} and {target}"
                )
    return table


def _entries(family: str, component: str, paths: list[str]):
    """(kohya name, (component, canonical path)) for every spelling of a UNet or CLIP module."""
    names = (WRITE_PREFIXES[family][component], *READ_ALIASES[family].get(component, ()))
    for path in paths:
        canonical = canonical_name(component, path)
        # Also without `text_model_`: diffusers' converter writes that under transformers 5.
        # A UNet's LDM name too (what sd-scripts writes for SDXL; some SD 1.x tools too).
        spellings = {canonical, canonical.removeprefix(TEXT_MODEL_LEVEL)}
        if component == "unet":
            try:
                spellings.add(map_module_name(canonical, _ldm_table(family)))
            except UnmappedKeyError:
                pass  # a layer outside SDXL's layout: only its diffusers spelling
        for prefix in names:
            for spelling in spellings:
                yield kohya_module_name(prefix, spelling), (component, canonical)


def _mmdit_entries(prefix: str, paths: list[str]):
    """SD3 transformer names: diffusers paths (under `prefix` and `lora_transformer`) and the
    original MMDiT ones; a fused qkv only where the model has all three of its layers."""
    present = set(paths)
    for path in paths:
        for alias in (prefix, TRANSFORMER_ALIAS):
            yield kohya_module_name(alias, path), ("transformer", path)
        try:
            original = mmdit.original_name(path).path
        except mmdit.MmditKeyError:
            continue  # a layer the original naming does not hold: its diffusers spelling only
        if set(mmdit.diffusers_paths(original)) <= present:
            yield kohya_module_name(prefix, original), ("transformer", original)


def _group(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = parse_kohya_key(key)
        groups.setdefault(parsed.module, {})[parsed.kind] = tensor
    for module, parts in groups.items():
        kinds = {_kind_of(p) for p in parts if p not in SHARED_PARTS}
        if len(kinds) != 1:
            raise KohyaKeyError(f"{module}: mixes the parts of {sorted(kinds) or 'no'} modules "
                                f"({sorted(parts)})")
        missing = _missing_parts(kinds.pop(), set(parts))
        if missing:
            raise KohyaKeyError(f"{module} lacks {missing}")
    return groups


def _kind_of(part: str) -> str:
    return "loha" if part.startswith("hada_") else "lokr" if part.startswith("lokr_") else "lora"


def _missing_parts(kind: str, parts: set[str]) -> str:
    """'' when `parts` make a whole module of `kind`, else what is missing."""
    if kind == "lora":
        need = {"lora_down", "lora_up"} - parts
        return " and ".join(sorted(need))
    if kind == "loha":
        need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} - parts
        if ("hada_t1" in parts) != ("hada_t2" in parts):  # Tucker cores come in pairs
            need |= {"hada_t1", "hada_t2"} - parts
        return " and ".join(sorted(need))
    for w in ("lokr_w1", "lokr_w2"):
        if w not in parts and not {f"{w}_a", f"{w}_b"} <= parts:
            return f"{w} (or {w}_a and {w}_b)"
    return ""


def module_from_parts(parts: dict[str, torch.Tensor]):
    """A LoraModule, LohaModule or LokrModule (float32) from one module's kohya/LyCORIS tensors,
    inside a DoraModule when the module has a `dora_scale`."""
    if "dora_scale" in parts:
        inner = module_from_parts({k: v for k, v in parts.items() if k != "dora_scale"})
        return DoraModule(inner, parts["dora_scale"].float())
    alpha = float(parts["alpha"].item()) if "alpha" in parts else None
    get = {k: v.float() for k, v in parts.items() if k != "alpha"}
    kind = _kind_of(next(iter(get)))
    if kind == "lora":
        down, up = get["lora_down"], get["lora_up"]
        return LoraModule(lora_A=down, lora_B=up, alpha=alpha if alpha is not None else float(down.shape[0]))
    if kind == "loha":
        r = get["hada_w1_b"].shape[0]
        return LohaModule(get["hada_w1_a"], get["hada_w1_b"], get["hada_w2_a"], get["hada_w2_b"],
                          alpha=alpha if alpha is not None else float(r),
                          t1=get.get("hada_t1"), t2=get.get("hada_t2"))
    return LokrModule(w1=get.get("lokr_w1"), w2=get.get("lokr_w2"), alpha=alpha,
                      w1_a=get.get("lokr_w1_a"), w1_b=get.get("lokr_w1_b"),
                      w2_a=get.get("lokr_w2_a"), w2_b=get.get("lokr_w2_b"), t2=get.get("lokr_t2"))


def module_tensors(name: str, module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS tensors of one module (inverse of `module_from_parts`); `.alpha` is
    float32 whatever `dtype` is, so that an alpha like 0.1 survives exactly enough."""
    if module.kind == "dora":
        tensors = module_tensors(name, module.inner, dtype)
        tensors[f"{name}.dora_scale"] = module.dora_scale.to(dtype).contiguous()
        return tensors
    if module.kind == "lora":
        parts = {"lora_down.weight": module.lora_A, "lora_up.weight": module.lora_B}
    elif module.kind == "loha":
        parts = {f"hada_{n}": getattr(module, n) for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")
                 if getattr(module, n) is not None}
    else:
        parts = {f"lokr_{n}": getattr(module, n)
                 for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2") if getattr(module, n) is not None}
    tensors = {f"{name}.{part}": t.to(dtype).contiguous() for part, t in parts.items()}
    if module.alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    return tensors


def _first(names: list[str], n: int = 5) -> str:
    shown = ", ".join(sorted(names)[:n])
    return shown + (f" ... ({len(names) - n} more)" if len(names) > n else "")


def from_kohya(
    tensors: dict[str, torch.Tensor], module_paths: dict[str, list[str]], family: str
) -> AdapterState:
    """Inverse of `to_kohya`. `module_paths`: the target model's module paths per component.

    Tensors come back as float32. A LoRA or LoHa module without `.alpha` gets alpha = r; a LoKr
    one keeps none (scale 1).
    """
    _check_family(family, "reading")
    table = lookup_table(module_paths, family)
    groups = _group(tensors)
    unmapped = [name for name in groups if name not in table]
    if unmapped and (len(unmapped) == len(groups) or len(unmapped) > MAX_UNMATCHED * len(groups)):
        raise KohyaKeyError(
            f"{len(unmapped)} of the file's {plural(len(groups), 'kohya module')} match no "
            f"{family} module "
            f"of the target model (e.g. {_first(unmapped, 3)}): {likely_cause(unmapped, tensors, family)}"
        )
    modules: dict[str, dict] = {}
    for name, parts in groups.items():
        if name not in table:
            continue
        component, resolved = table[name]
        for path, module in _read_modules(family, component, resolved, module_from_parts(parts)).items():
            if path in modules.get(component, {}):
                raise KohyaKeyError(f"{component} module {path!r} appears twice (e.g. as {name!r})")
            modules.setdefault(component, {})[path] = module
    unmatched = {name: "no module of that name in the target model" for name in unmapped}
    return AdapterState(family=family, modules=modules, unmatched=unmatched)


def _read_modules(family: str, component: str, path: str, module) -> dict:
    """{canonical path: module} for one file module resolved to `path`: itself, except an SD3
    transformer module under its original MMDiT name (a fused qkv splits into q, k and v)."""
    if not (component == "transformer" and family == "sd3" and mmdit.is_original(path)):
        return {path: module}
    try:
        return mmdit.from_original_module(path, module)
    except mmdit.MmditKeyError as e:
        raise KohyaKeyError(str(e)) from None


def likely_cause(names: list[str], tensors: dict[str, torch.Tensor], family: str) -> str:
    """Why a file's modules do not match the base, from their names and shapes."""
    base = FAMILY_NAMES[family]
    # UNet names never start with transformer_blocks (theirs sit inside attentions_N).
    mmdit_named = any(n.startswith(("lora_unet_joint_blocks_", "lora_unet_transformer_blocks_",
                                    f"{TRANSFORMER_ALIAS}_")) for n in names)
    if mmdit_named and family != "sd3":
        return f"this looks like an SD3 LoRA (MMDiT joint_blocks or transformer names); the base is {base}"
    if family == "sd3":
        return _sd3_cause(names, mmdit_named)
    if any(n.startswith("lora_te2_") for n in names) or any(
            part in n for n in names for part in ("input_blocks_", "output_blocks_", "middle_block_")):
        return f"this looks like an SDXL LoRA (LDM block names or a second text encoder); the base is {base}"
    for key, tensor in tensors.items():
        if key.endswith("attn2_to_k.lora_down.weight"):
            width = int(tensor.shape[1])
            other = CONTEXT_WIDTH_FAMILY.get(width)
            if other is not None and other != family:
                return (f"its cross-attention reads text features {width} wide, as "
                        f"{FAMILY_NAMES[other]} does; the base is {base}")
    return "the adapter is for another architecture, or its layout is one sd-lora does not know"


def _sd3_cause(names: list[str], mmdit_named: bool) -> str:
    """Why names do not match an SD3 base: a UNet LoRA, or an MMDiT of another depth."""
    if any(part in n for n in names for part in ("input_blocks_", "output_blocks_", "middle_block_",
                                                  "down_blocks_", "up_blocks_", "mid_block_")):
        return "this looks like a UNet LoRA (SD 1.x, SD 2.x or SDXL); the base is SD 3.x"
    if mmdit_named:
        return ("its MMDiT blocks or layers differ from the base's: is it for another SD3 model? "
                "(SD 3.5 Large has 38 blocks; SD 3.5 Medium and SD 3 Medium 24, and only SD 3.5 "
                "Medium a second attention, attn2, in blocks 0-12)")
    return "the adapter is for another architecture, or its layout is one sd-lora does not know"
