"""Apply adapters to a loaded pipeline by merging their deltas into the base weights, in place.

    applied = apply_adapters(pipe, [(style, 0.7, 0.7), (detail, -0.3, 0.0)])
    ...generate...
    applied = apply_adapters(pipe, [(style, 0.5, 0.5)], replace=applied)   # new strengths: fast
    restore(pipe, applied)                                                 # exact originals back

or `with adapters_applied(pipe, entries): ...`. Each touched layer becomes
`W0 + sum_i strength_i * block_i * (alpha_i / r_i) * B_i @ A_i`, computed in float32 on the
weight's device and stored in the weight's own dtype; `block_i` is 1 unless the entry carries
LoRA Block Weights (`AdapterUse(state, blocks=parse_block_weights("INS"))`, see
`sd_lora.adapters.block_weights`). Float32 copies of the original weights of only the touched
layers are kept, so changing strengths never re-reads the base and `restore` is bit-exact.
Every adapter is checked (family, module paths, shapes) before any weight is touched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from sd_lora.adapters.block_weights import BlockWeightError
from sd_lora.adapters.files import (
    adapter_from_tensors,
    component_modules,
    detect_family,
    pipeline_module_paths,
    read_tensors,
)
from sd_lora.adapters.use import AdapterUse
from sd_lora.errors import UserError
from sd_lora.formats.adapter_state import (
    FAMILY_NAMES,
    AdapterState,
    applied_delta,
    delta_shape,
    fits,
)
from sd_lora.models.families import model_family
from sd_lora.util.words import plural

APPLIED_ATTR = "_sd_lora_applied"  # the pipeline remembers what is merged, to refuse double merges


class AdapterApplyError(UserError):  # a ValueError too, as before
    """An adapter that does not fit the pipeline; the message names the adapter and module."""


@dataclass
class AppliedAdapters:
    """What `apply_adapters` merged; pass it to `restore` or as `replace=` to re-apply."""

    entries: list[AdapterUse[AdapterState]]
    originals: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # float32 copies
    coverage: list[dict[str, int]] = field(default_factory=list)  # per entry: component -> modules

    def summary(self) -> str:
        lines = []
        for i, (entry, counts) in enumerate(zip(self.entries, self.coverage)):
            parts = ", ".join(f"{c} {plural(n, 'module')}" for c, n in counts.items())
            blocks = "" if entry.blocks is None else (
                ", blocks " + ",".join(f"{w:g}" for w in entry.blocks)
            )
            denoiser = "transformer" if entry.adapter.family == "sd3" else "unet"
            lines.append(
                f"{entry.label(i)}: {denoiser} x{entry.unet:g}, text x{entry.text_encoder:g}"
                f"{blocks} ({parts})"
            )
        return "\n".join(lines)


def _as_use(item) -> AdapterUse[AdapterState]:
    """An `AdapterUse` of a loaded state, a bare state (strengths 1), or (state, unet, te)."""
    if isinstance(item, AdapterUse):
        return item
    if isinstance(item, AdapterState):
        return AdapterUse(item)
    return AdapterUse(*item)


def check_fits(pipe, entries: Sequence[AdapterUse[AdapterState]], layers=None) -> list[dict[str, int]]:
    """Raise `AdapterApplyError` unless every module of every adapter has a matching layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    family = model_family(pipe)
    layers = layers if layers is not None else component_modules(pipe)
    coverage = []
    for i, entry in enumerate(entries):
        name = entry.label(i)
        if entry.adapter.family != family:
            raise AdapterApplyError(family_mismatch(name, entry.adapter.family, family))
        counts = {}
        for component, modules in entry.adapter.modules.items():
            if component not in layers:
                raise AdapterApplyError(f"{name} adapts {component!r}, which this pipeline lacks")
            for path, module in modules.items():
                layer = layers[component].get(path)
                if layer is None:
                    raise AdapterApplyError(
                        f"{name}: {component} module {path!r} does not exist in this pipeline; "
                        "the adapter is for another architecture (check the base model)"
                    )
                if isinstance(layer, BaseTunerLayer):
                    raise AdapterApplyError(
                        f"{name}: {component}.{path} already carries PEFT LoRA layers; call "
                        "pipe.unload_lora_weights() (or use a pipeline without them) first"
                    )
                want, have = tuple(delta_shape(module)), tuple(layer.weight.shape)
                if not fits(module, have):
                    raise AdapterApplyError(
                        f"{name}: {component}.{path} delta has shape {want} but the layer's "
                        f"weight is {have}; the adapter does not fit this base model"
                    )
            counts[component] = len(modules)
        _check_block_weights(entry, name)
        coverage.append(counts)
    return coverage


def family_mismatch(name, adapter_family: str, base_family: str) -> str:
    """The sentence that refuses an adapter of one family for a base of another."""
    ours, theirs = FAMILY_NAMES[adapter_family], FAMILY_NAMES[base_family]  # "SD ...": "an"
    return (f"{name} was trained for {adapter_family!r} but the pipeline is {base_family!r} "
            f"(an {ours} adapter on an {theirs} base); use an adapter made for an {theirs} base "
            f"(or load an {ours} base)")


def load_for(pipe, path: str | os.PathLike, allow_pickle: bool = False, name: str | None = None
             ) -> AdapterState:
    """`load_adapter` against `pipe`'s own module paths, its family checked first: a kohya file
    of another family would otherwise fail on its names (an SD3 file's MMDiT names on a UNet)
    rather than on what is wrong."""
    tensors, metadata = read_tensors(path, allow_pickle)
    family, base = detect_family(tensors, metadata), model_family(pipe)
    if family is not None and family != base:
        raise AdapterApplyError(family_mismatch(name or str(path), family, base))
    return adapter_from_tensors(tensors, metadata, pipeline_module_paths(pipe), source=path)


def _check_block_weights(entry: AdapterUse[AdapterState], name: str) -> None:
    """Every module must map to a block before any weight moves (block_weight raises if not)."""
    if entry.blocks is None:
        return
    if entry.adapter.family not in ("sd1", "sd2"):
        raise AdapterApplyError(
            f"{name}: block weights are defined for SD 1.x/2.x UNets, not {entry.adapter.family!r}"
        )
    try:
        for component, modules in entry.adapter.modules.items():
            for path in modules:
                entry.module_strength(component, path)
    except BlockWeightError as e:
        raise AdapterApplyError(f"{name}: {e}") from e


@torch.no_grad()
def _merge(layers, originals, entries: Sequence[AdapterUse[AdapterState]]) -> None:
    """Set every layer in `originals` to its original plus the entries' scaled deltas."""
    for (component, path), original in originals.items():
        weight = layers[component][path].weight
        total = original.to(weight.device, copy=True)
        for entry in entries:
            module = entry.adapter.modules.get(component, {}).get(path)
            if module is None:
                continue
            strength = entry.module_strength(component, path)
            if strength != 0.0:  # each against the original weight (DoRA depends on it)
                total += applied_delta(module, original.to(weight.device), strength)
        weight.copy_(total.to(weight.dtype))


def apply_adapters(
    pipe, adapters: Sequence, *, replace: AppliedAdapters | None = None
) -> AppliedAdapters:
    """Merge `adapters` ((state, unet_strength, te_strength[, name]) each) into `pipe`'s weights.

    With `replace`, the adapters merged by that earlier call are taken out first (from the kept
    originals, without reloading anything); otherwise the pipeline must have none merged.
    """
    entries = [_as_use(a) for a in adapters]
    current = getattr(pipe, APPLIED_ATTR, None)
    if current is not None and current is not replace:
        raise AdapterApplyError(
            "adapters are already merged into this pipeline; pass replace=<the AppliedAdapters "
            "returned then> or call restore(pipe, applied) first"
        )
    layers = component_modules(pipe)
    coverage = check_fits(pipe, entries, layers)
    originals = dict(replace.originals) if replace is not None else {}
    for entry in entries:
        for component, modules in entry.adapter.modules.items():
            for path in modules:
                if (component, path) not in originals:
                    weight = layers[component][path].weight
                    originals[(component, path)] = weight.detach().to(torch.float32, copy=True)
    _merge(layers, originals, entries)
    applied = AppliedAdapters(entries=entries, originals=originals, coverage=coverage)
    setattr(pipe, APPLIED_ATTR, applied)
    return applied


@torch.no_grad()
def restore(pipe, applied: AppliedAdapters) -> None:
    """Put back the exact original weights of every layer `applied` touched."""
    if getattr(pipe, APPLIED_ATTR, None) is not applied:
        raise AdapterApplyError("these adapters are not the ones merged into this pipeline")
    layers = component_modules(pipe)
    for (component, path), original in applied.originals.items():
        weight = layers[component][path].weight
        weight.copy_(original.to(device=weight.device, dtype=weight.dtype))
    delattr(pipe, APPLIED_ATTR)


@contextlib.contextmanager
def adapters_applied(pipe, adapters: Sequence) -> Iterator[AppliedAdapters]:
    """`apply_adapters` for the duration of a `with` block; the originals come back after."""
    applied = apply_adapters(pipe, adapters)
    try:
        yield applied
    finally:
        restore(pipe, applied)
