"""What is in an adapter file: layout, base family, adapted layers, ranks, alphas, metadata, hashes.

`inspect_adapter(path)` returns a plain dict (JSON-friendly); `format_inspection(info)` renders it
for `sd-lora inspect`. A file whose names cannot be resolved against its family's standard module
table (`files.reference_module_paths`) is still described from its raw key names, with the
problem listed.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch

from sd_lora.adapters.files import (
    AdapterFileError,
    adapter_from_tensors,
    detect_family,
    detect_format,
    nonfinite_problem,
    read_tensors,
)
from sd_lora.adapters.tool_support import dora_axes, tool_notes
from sd_lora.choices import TARGET_GROUPS
from sd_lora.formats.kohya import KohyaKeyError, parse_kohya_key
from sd_lora.formats.metadata import HASH_KEYS, file_hashes
from sd_lora.formats.peft_diffusers import DiffusersKeyError, from_diffusers
from sd_lora.util.words import plural

# Layer kinds recognised in module paths, longest first so that `ff.net.0.proj` wins over `proj`.
# SD3's groups name the attention too (`attn.to_q`, `attn2.to_q`): the kind is the layer's.
KNOWN_KINDS = sorted(
    {s.removeprefix("attn.").removeprefix("attn2.")
     for table in TARGET_GROUPS.values() for g in table.values() for s in g},
    key=len,
    reverse=True,
)
MAX_TRIGGER_WORDS = 5  # what the app shows of a file's trigger words


def layer_kind(path: str) -> str:
    """`...attn1.to_q` -> `to_q`; `...mlp.fc1` -> `fc1`; unknown layers: the last name part."""
    for kind in KNOWN_KINDS:
        if path == kind or path.endswith("." + kind) or path.endswith("_" + kind.replace(".", "_")):
            return kind
    return path.replace("_", ".").rsplit(".", 1)[-1]


def _dtypes(tensors) -> list[str]:
    return sorted(
        {
            str(t.dtype).removeprefix("torch.")
            for k, t in tensors.items()
            if not k.endswith(".alpha")
        }
    )


def _numbers(values) -> list:
    return sorted({int(v) if float(v).is_integer() else float(v) for v in values})


def _summary(names, ranks, alphas) -> dict:
    return {
        "modules": len(names),
        "layer_kinds": dict(sorted(Counter(layer_kind(n) for n in names).items())),
        "ranks": _numbers(ranks),
        "alphas": _numbers(alphas),
    }


def _from_state(state) -> dict:
    return {
        component: _summary(
            modules, [m.r for m in modules.values()], [m.alpha for m in modules.values()]
        )
        for component, modules in state.modules.items()
    }


def _from_raw(tensors, metadata, layout: str, family: str | None) -> dict:
    """Files whose names or family do not resolve: describe them from the keys alone."""
    if layout == "diffusers":  # the family plays no part in reading this layout
        return _from_state(from_diffusers(tensors, metadata, family="sd1"))
    groups: dict[str, dict[str, dict]] = {}
    for key, tensor in tensors.items():
        parsed = parse_kohya_key(key)
        # sd-scripts writes SD3's transformer under lora_unet_ too: name the component it is
        component = "transformer" if family == "sd3" and parsed.component == "unet" else parsed.component
        groups.setdefault(component, {}).setdefault(parsed.module, {})[parsed.kind] = tensor
    components = {}
    for component, modules in groups.items():
        pairs = [p for p in modules.values() if "lora_down" in p]
        ranks = [p["lora_down"].shape[0] for p in pairs]
        alphas = [p["alpha"].item() if "alpha" in p else p["lora_down"].shape[0] for p in pairs]
        components[component] = _summary(modules, ranks, alphas)
    return components


def _hash_check(path: Path, metadata: dict) -> dict:
    if path.suffix.lower() != ".safetensors":  # a pickle (--allow-pickle): no hashes defined
        return {}
    recomputed = file_hashes(path.read_bytes())
    checks = {}
    for key in HASH_KEYS:
        stored = metadata.get(key)
        checks[key] = {
            "stored": stored,
            "recomputed": recomputed[key],
            "agrees": None if stored is None else stored == recomputed[key],
        }
    return checks


def _damage(path: Path, tensors: dict, hashes: dict) -> list[str]:
    """Signs that the file's tensors are not what was written: NaN/inf values, or data that no
    longer matches its stored hash. The legacy hash is left out: it also covers header bytes,
    which tools rewrite when they edit the metadata (sd-scripts' own files often differ)."""
    damage = [problem] if (problem := nonfinite_problem(tensors, path)) else []
    data_hash = hashes.get("sshs_model_hash", {})
    if data_hash.get("agrees") is False:
        damage.append(f"{path}: the tensor data differs from the sshs_model_hash stored when the "
                      "file was written: it was changed or damaged since; re-download or "
                      "re-export it")
    return damage


def inspect_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
    """Describe an adapter file; raises `AdapterFileError` only when it cannot be read at all.
    `damage` lists what makes it unusable as it is (see `_damage`)."""
    path = Path(path)
    tensors, metadata = read_tensors(path, allow_pickle)
    layout = detect_format(tensors, path)
    family = detect_family(tensors, metadata)
    problems: list[str] = []
    kinds: list[str] = []
    axes: set[str] = set()
    try:
        state = adapter_from_tensors(tensors, metadata, source=path, check_finite=False)
        components, kinds = _from_state(state), sorted(state.kinds())
        axes = dora_axes(state)
        if state.unmatched:
            problems.append(f"{state.coverage()} (against the standard {family} layout)")
    except AdapterFileError as e:
        problems.append(str(e))
        try:
            components = _from_raw(tensors, metadata, layout, family)
        except (KohyaKeyError, DiffusersKeyError) as raw_error:
            problems.append(str(raw_error))
            components = {}
    hashes = _hash_check(path, metadata)
    return {
        "path": str(path),
        "file_size": path.stat().st_size,
        "format": layout,
        "module_kinds": kinds,  # lora, loha, lokr
        "family": family,
        "tensors": len(tensors),
        "dtypes": _dtypes(tensors),
        "components": components,
        "ranks": sorted({r for c in components.values() for r in c["ranks"]}),
        "alphas": sorted({a for c in components.values() for a in c["alphas"]}),
        "hashes": hashes,
        "metadata": metadata,
        "problems": problems,
        "tools": tool_notes(layout, axes, family),  # tools that do not apply it as trained
        "damage": _damage(path, tensors, hashes),
    }


def _short(value: str, limit: int = 100) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= limit else value[: limit - 3] + "..."


def format_inspection(info: dict) -> str:
    """Human-readable report of `inspect_adapter`'s result, for the CLI."""
    lines = [
        f"{info['path']}  ({info['file_size']:,} bytes)",
        f"  format: {info['format']}"
        + (f" ({', '.join(info['module_kinds'])} modules)" if info["module_kinds"] not in ([], ["lora"]) else "")
        + f"   family: {info['family'] or 'unknown'}   "
        f"tensors: {info['tensors']}   dtype: {', '.join(info['dtypes'])}",
    ]
    for component, c in info["components"].items():
        kinds = ", ".join(f"{k} x{n}" for k, n in c["layer_kinds"].items())
        lines.append(
            f"  {component}: {plural(c['modules'], 'module')}, rank {c['ranks']}, "
            f"alpha {c['alphas']}"
        )
        lines.append(f"    layers: {kinds}")
    for key, check in info["hashes"].items():
        verdict = {True: "agrees", False: "DIFFERS", None: "not stored"}[check["agrees"]]
        if key == "sshs_legacy_hash" and check["agrees"] is False:
            verdict = "differs: it also covers header bytes, which metadata edits move"
        lines.append(f"  {key}: {check['recomputed']} ({verdict})")
    shown = {k: v for k, v in info["metadata"].items() if k not in HASH_KEYS}
    if shown:
        lines.append("  metadata:")
        for key in sorted(shown):
            value = shown[key]
            if key == "ss_tag_frequency":
                value = _tag_summary(value)
            lines.append(f"    {key}: {_short(value)}")
    for note in info.get("tools", []):
        lines.append(f"  tools: {note}")
    for problem in info["problems"]:
        lines.append(f"  problem: {problem}")
    for damage in info["damage"]:
        lines.append(f"  DAMAGED: {damage}")
    return "\n".join(lines)


def _tag_summary(raw: str) -> str:
    try:
        folders = json.loads(raw)
        counts = Counter()
        for tags in folders.values():
            counts.update(tags)
    except (json.JSONDecodeError, AttributeError, TypeError):
        return raw
    return ", ".join(f"{tag} ({n})" for tag, n in counts.most_common(10)) or "(none)"


@dataclass(frozen=True)
class HeaderSummary:
    """What an adapter file's header tells without reading its tensors (the app's lists)."""

    family: str | None
    layout: str | None  # "kohya" or "diffusers"
    rank: int | None
    alpha: float | None
    trigger_words: list[str]
    problem: str | None  # why it cannot be used, or None


def summarize_header(path: Path) -> HeaderSummary:
    """The header's description of one adapter file; problems are reported, never raised."""
    try:
        metadata, shapes = _read_header(path)
    except Exception as e:  # safetensors raises several types for damaged files
        return HeaderSummary(None, None, None, None, [],
                             f"not a readable safetensors file ({type(e).__name__}: {e})")
    problem = None
    try:
        layout = detect_format(shapes, path)
    except AdapterFileError as e:
        layout, problem = None, str(e)
    family = _family_from_shapes(metadata, shapes)
    if family is None and problem is None:
        problem = "the file states no base family and its shapes do not tell"
    rank, alpha = _rank_alpha(path, metadata, shapes)
    return HeaderSummary(family, layout, rank, alpha, trigger_words(metadata), problem)


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    return metadata, shapes


def _family_from_shapes(metadata: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """`adapter_io.detect_family` on shape-only stand-ins: meta tensors hold no data."""
    return detect_family({k: torch.empty(s, device="meta") for k, s in shapes.items()}, metadata)


def _rank_alpha(path, metadata, shapes) -> tuple[int | None, float | None]:
    """`ss_network_dim`/`ss_network_alpha`, else the most common over the modules (as those
    keys are defined); a kohya module without `.alpha` has alpha = rank."""
    try:
        rank = int(metadata["ss_network_dim"]) if "ss_network_dim" in metadata else None
        alpha = float(metadata["ss_network_alpha"]) if "ss_network_alpha" in metadata else None
    except ValueError:
        rank = alpha = None
    downs = [k for k in shapes if k.endswith(".lora_down.weight")]
    if downs and (rank is None or alpha is None):
        with safetensors.safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            pairs = []
            for key in downs:
                r, alpha_key = int(shapes[key][0]), key.replace(".lora_down.weight", ".alpha")
                pairs.append((r, float(f.get_tensor(alpha_key).item()) if alpha_key in keys else r))
        rank = rank if rank is not None else Counter(r for r, _ in pairs).most_common(1)[0][0]
        alpha = alpha if alpha is not None else Counter(a for _, a in pairs).most_common(1)[0][0]
    elif rank is None:
        ranks = [int(shape[0]) for key, shape in shapes.items() if key.endswith(".lora_A.weight")]
        rank = Counter(ranks).most_common(1)[0][0] if ranks else None
    return rank, alpha


def trigger_words(metadata: dict[str, str]) -> list[str]:
    """The trigger phrase the trainer recorded (`modelspec.trigger_phrase`), then the most
    frequent tags of `ss_tag_frequency` over all dataset folders that recur (at most 5 in all).
    A tag of one image only is no trigger word: with sentence captions ("zkpastel, two red
    circles on ...") ss_tag_frequency counts each whole sentence once."""
    phrase = (metadata.get("modelspec.trigger_phrase") or "").strip()
    try:
        folders = json.loads(metadata.get("ss_tag_frequency") or "{}")
        counts: Counter = Counter()
        for tags in folders.values():
            counts.update({str(tag): int(n) for tag, n in tags.items()})
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        counts = Counter()  # display only: a malformed value must not hide the adapter
    recurring = [tag for tag, n in counts.most_common() if n > 1 and tag != phrase.lower()]
    return (([phrase] if phrase else []) + recurring)[:MAX_TRIGGER_WORDS]
