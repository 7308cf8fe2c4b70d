"""Pure functions from adapters to adapters: merge several, change the rank, build one from a
weight difference. Each returns the new `AdapterState` and what it cost (relative error or
energy kept per module), so the command line can report it.

Every module's effect is its delta `strength * alpha / r * B @ A` (conv kernels flattened to
(out, in*kh*kw)); the results below are defined on those deltas:
- an exact merge concatenates ranks, so its delta is the weighted sum of the inputs' deltas;
- a compressed merge, a resize and an extraction keep the leading singular vectors of the
  delta (the best rank-r approximation in the Frobenius norm), with alpha = r (scale 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sd_lora.errors import UserError
from sd_lora.formats.adapter_state import AdapterState, LoraModule
from sd_lora.util.words import plural

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
RANK_TOLERANCE = 1e-6  # singular values below this share of the largest are float rounding


class TransformError(UserError):  # a ValueError too
    """Adapters that cannot be combined or resized as asked; the message says why."""


@dataclass(frozen=True)
class ModuleReport:
    component: str
    path: str
    rank_before: int
    rank_after: int
    energy_kept: float  # share of the delta's squared Frobenius norm kept (1.0: exact)
    relative_error: float  # ||delta - new delta||_F / ||delta||_F


def flat(delta: torch.Tensor) -> torch.Tensor:
    """(out, in) or (out, in, kh, kw) -> (out, in*kh*kw)."""
    return delta.reshape(delta.shape[0], -1)


def module_from_factors(up: torch.Tensor, down: torch.Tensor, like: torch.Size) -> LoraModule:
    """A LoraModule with alpha = r (scale 1) whose delta is up @ down, shaped as `like` (the
    delta's shape: a Linear's (out, in) or a conv's (out, in, kh, kw))."""
    r = down.shape[0]
    if len(like) == 4:
        return LoraModule(lora_A=down.reshape(r, *like[1:]).contiguous(),
                          lora_B=up.reshape(like[0], r, 1, 1).contiguous(), alpha=float(r))
    return LoraModule(lora_A=down.contiguous(), lora_B=up.contiguous(), alpha=float(r))


def low_rank(delta: torch.Tensor, rank: int) -> tuple[LoraModule, torch.Tensor]:
    """The best rank-`rank` LoRA of `delta` and the delta's singular values (descending). The
    rank never exceeds the delta's own (singular values above RANK_TOLERANCE of the largest):
    more would store directions that change nothing."""
    matrix = flat(delta.double())
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = max(1, min(rank, numerical_rank(s)))
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).float()
    down = (root[:, None] * vh[:rank]).float()
    return module_from_factors(up, down, delta.shape), s


def numerical_rank(singular_values: torch.Tensor) -> int:
    s = singular_values
    return int((s > s[0] * RANK_TOLERANCE).sum()) if s.numel() and s[0] > 0 else 0


def energy(singular_values: torch.Tensor, rank: int) -> float:
    total = float((singular_values**2).sum())
    return 1.0 if total == 0 else float((singular_values[:rank] ** 2).sum()) / total


def relative_error(delta: torch.Tensor, module: LoraModule) -> float:
    norm = float(delta.double().norm())
    return 0.0 if norm == 0 else float((delta.double() - module.delta(dtype=torch.float64)).norm()) / norm


def dynamic_rank(singular_values: torch.Tensor, method: str, value: float, max_rank: int) -> int:
    """The rank a dynamic method keeps (as sd-scripts' resize_lora names them):
    sv_ratio: singular values at least s_max / value; sv_fro: the smallest rank whose share of
    the Frobenius norm reaches `value`; sv_cumulative: the same for the sum of singular values."""
    s = singular_values.double()
    if s.numel() == 0 or float(s[0]) == 0:
        return 1
    if method == "sv_ratio":
        if value < 1:
            raise TransformError(f"sv_ratio = {value} must be at least 1")
        rank = int((s >= s[0] / value).sum())
    elif method in ("sv_fro", "sv_cumulative"):
        if not 0 < value <= 1:
            raise TransformError(f"{method} = {value} must be in (0, 1]")
        share = (s**2).cumsum(0) / (s**2).sum() if method == "sv_fro" else s.cumsum(0) / s.sum()
        if method == "sv_fro":
            share = share.sqrt()
        rank = int((share < value - 1e-12).sum()) + 1
    else:
        raise TransformError(f"unknown method {method!r}; use one of {DYNAMIC_METHODS}")
    return max(1, min(rank, max_rank, s.numel()))


def _check_no_dora(states: Sequence[AdapterState]) -> None:
    """DoRA's change depends on the base weight (see lora_state.DoraModule): there is no
    base-independent delta to sum or factor."""
    if any("dora" in s.kinds() for s in states):
        raise TransformError(
            "the adapter holds DoRA modules (dora_scale): their change depends on the base "
            "layer's weight, so they cannot be merged with others or resized on their own; "
            "bake them into a base instead (sd-lora merge A.safetensors --into BASE --out C.safetensors)"
        )


def _check_same_family(states: Sequence[AdapterState]) -> str:
    families = {s.family for s in states}
    if len(families) != 1:
        raise TransformError(f"cannot merge adapters of different base families: {sorted(families)}")
    return families.pop()


def _shape_of(module: LoraModule) -> torch.Size:
    return module.delta().shape


def merge(
    weighted: Sequence[tuple[AdapterState, float]], rank: int | None = None
) -> tuple[AdapterState, list[ModuleReport]]:
    """One adapter whose delta is sum(weight * delta) of the inputs, module by module.

    rank=None: exact (ranks concatenated; a module in one input only keeps its rank).
    rank=R: the sum compressed to rank R by SVD, with the relative error of each module."""
    if not weighted:
        raise TransformError("merge needs at least one adapter")
    _check_no_dora([s for s, _ in weighted])
    family = _check_same_family([s for s, _ in weighted])
    merged = AdapterState(family=family)
    reports: list[ModuleReport] = []
    keys = sorted({(c, p) for s, _ in weighted for c, mods in s.modules.items() for p in mods})
    for component, path in keys:
        parts = [(s.modules[component][path], w) for s, w in weighted
                 if path in s.modules.get(component, {})]
        shapes = {_shape_of(m) for m, _ in parts}
        if len(shapes) != 1:
            raise TransformError(f"{component} {path}: the adapters disagree on its shape "
                                 f"({sorted(tuple(s) for s in shapes)}); they are for different bases")
        like = shapes.pop()
        rank_before = sum(m.r for m, _ in parts)
        total = sum(m.delta(w, torch.float64) for m, w in parts)
        if rank is None:
            if any(m.kind != "lora" for m, _ in parts):
                raise TransformError(f"{component} {path}: an exact merge concatenates LoRA ranks; "
                                     "LoHa/LoKr modules need --rank (the sum is re-factored by SVD)")
            up = torch.cat([flat(m.lora_B.double()) * (w * m.scale) for m, w in parts], dim=1)
            down = torch.cat([flat(m.lora_A.double()) for m, _ in parts], dim=0)
            module = module_from_factors(up.float(), down.float(), like)
            kept = 1.0
        else:
            module, s = low_rank(total, rank)
            kept = energy(s, module.r)
        merged.modules.setdefault(component, {})[path] = module
        reports.append(ModuleReport(component, path, rank_before, module.r, kept,
                                    relative_error(total, module)))
    merged.metadata = _carried_metadata(weighted[0][0])
    return merged, reports


def resize(
    state: AdapterState, rank: int | None, method: str | None = None, value: float | None = None
) -> tuple[AdapterState, list[ModuleReport]]:
    """Each module re-factored to `rank` (or, with a dynamic `method`, to the rank it picks from
    the module's singular values, at most `rank`; rank None: at most the module's own), with
    the energy kept."""
    if rank is None and method is None:
        raise TransformError("resize needs a rank, a dynamic method (one of "
                             f"{', '.join(DYNAMIC_METHODS)}), or both")
    if rank is not None and rank < 1:
        raise TransformError(f"rank = {rank} must be at least 1")
    _check_no_dora([state])
    out = AdapterState(family=state.family, metadata=_carried_metadata(state))
    reports = []
    for component, modules in state.modules.items():
        for path, module in modules.items():
            delta = module.delta(dtype=torch.float64)
            _, s = low_rank(delta, 1)
            cap = module.r if rank is None else rank
            keep = cap if method is None else dynamic_rank(s, method, value, cap)
            new, s = low_rank(delta, keep)
            out.modules.setdefault(component, {})[path] = new
            reports.append(ModuleReport(component, path, module.r, new.r, energy(s, new.r),
                                        relative_error(delta, new)))
    return out, reports


def from_differences(
    family: str, differences: dict[str, dict[str, torch.Tensor]], rank: int,
    min_relative: float = 0.0,
) -> tuple[AdapterState, list[ModuleReport]]:
    """An adapter approximating weight differences {component: {module path: tuned - base}}.
    Modules whose difference is below `min_relative` of the largest one are left out."""
    norms = [float(d.double().norm()) for mods in differences.values() for d in mods.values()]
    if not norms or max(norms) == 0:
        raise TransformError("the two models have the same weights in every adapted layer")
    floor = min_relative * max(norms)
    out = AdapterState(family=family)
    reports = []
    for component, modules in differences.items():
        for path, delta in modules.items():
            if float(delta.double().norm()) <= floor:
                continue
            module, s = low_rank(delta, rank)
            out.modules.setdefault(component, {})[path] = module
            reports.append(ModuleReport(component, path, numerical_rank(s), module.r,
                                        energy(s, module.r), relative_error(delta, module)))
    return out, reports


def _carried_metadata(state: AdapterState) -> dict[str, str]:
    """The training description of the (first) source; rank, alpha and hashes are rewritten
    from the new tensors when the file is saved."""
    return {k: v for k, v in state.metadata.items() if k.startswith(("ss_", "modelspec."))}


def summary(reports: Sequence[ModuleReport]) -> str:
    """A few lines for the command line: modules, ranks, the worst error, the least energy."""
    if not reports:
        return "no modules"
    worst = max(reports, key=lambda r: r.relative_error)
    least = min(reports, key=lambda r: r.energy_kept)
    ranks = sorted({r.rank_after for r in reports})
    shown = ", ".join(map(str, ranks[:8])) + (" ..." if len(ranks) > 8 else "")
    return (f"{plural(len(reports), 'module')}, rank {shown}; largest relative error "
            f"{worst.relative_error:.2e} ({worst.component} {worst.path}); least energy kept "
            f"{least.energy_kept:.2%} ({least.component} {least.path})")
