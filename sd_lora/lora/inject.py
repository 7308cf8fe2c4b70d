"""Choose which layers get LoRA, add it through PEFT, and read the trained weights back.

The LoRA math lives in PEFT; this module only decides targets (in one table per component) and
translates between PEFT's injected layers and `AdapterState`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key

from sd_lora.choices import CONV_GROUPS, TARGET_GROUPS
from sd_lora.formats.adapter_state import AdapterState, DoraModule, LoraModule, canonical_name

ADAPTER_NAME = "default"

# The parameter names of what trains: LoRA's two factors and DoRA's magnitudes.
TRAINED_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")


def target_suffixes(component: str, groups: tuple[str, ...]) -> list[str]:
    """Module-name suffixes for the named target groups; raises naming the supported groups."""
    table = TARGET_GROUPS.get(component)
    if table is None:
        raise ValueError(f"no LoRA targets for component {component!r}; known: {list(TARGET_GROUPS)}")
    if not groups:
        raise ValueError(f"{component}: choose at least one target group from {sorted(table)}")
    suffixes: list[str] = []
    for group in groups:
        if group not in table:
            raise ValueError(
                f"{component}: unknown LoRA target {group!r}; supported: {sorted(table)}"
            )
        suffixes.extend(table[group])
    return suffixes


def _adaptable(module: torch.nn.Module, any_conv: bool = False) -> bool:
    """Linear layers, and 1x1 convolutions (SD 1.x's proj_in/proj_out are Conv2d 1x1); with
    `any_conv`, convolutions of any kernel (LoCon)."""
    if isinstance(module, torch.nn.Linear):
        return True
    if not isinstance(module, torch.nn.Conv2d):
        return False
    return any_conv or tuple(module.kernel_size) == (1, 1)


def is_kxk_conv(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def target_module_names(model: torch.nn.Module, suffixes: list[str],
                        any_conv: bool = False) -> list[str]:
    """Full names of the adaptable layers whose names end with one of the suffixes."""
    names = []
    for name, module in model.named_modules():
        if _adaptable(module, any_conv) and any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
    return names


def pattern_matches(pattern: str, module_name: str) -> bool:
    """Whether PEFT applies a rank_pattern / alpha_pattern key to this module: asked of PEFT's
    own matcher, so that our checks (unused patterns, conv ranks) agree with what it injects."""
    return get_pattern_key([pattern], module_name) == pattern


def add_lora(
    model: torch.nn.Module,
    component: str,
    groups: tuple[str, ...],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    use_dora: bool = False,
    conv_r: int | None = None,
    conv_alpha: float | None = None,
) -> list[str]:
    """Inject trainable LoRA layers (fp32) into a frozen model; returns the adapted module names.
    `rank_pattern` / `alpha_pattern` ({regex: value}, PEFT's) override r / alpha per module;
    k x k convolutions (the `conv` group) get `conv_r` / `conv_alpha` when given."""
    names = target_module_names(model, target_suffixes(component, groups),
                                any_conv=any(g in CONV_GROUPS for g in groups))
    if not names:
        raise ValueError(
            f"{component}: none of the target groups {list(groups)} matched a layer of this model"
        )
    def relevant(patterns):  # only this model's (PEFT warns about the others)
        return {k: v for k, v in (patterns or {}).items() if any(pattern_matches(k, n) for n in names)}

    ranks, alphas = relevant(rank_pattern), relevant(alpha_pattern)
    for name in names:  # the user's patterns win where they match
        if is_kxk_conv(model.get_submodule(name)):
            if conv_r and not any(pattern_matches(p, name) for p in ranks):
                ranks[re.escape(name)] = conv_r
            if conv_alpha and not any(pattern_matches(p, name) for p in alphas):
                alphas[re.escape(name)] = conv_alpha
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                        rank_pattern=ranks, alpha_pattern=alphas, use_dora=use_dora)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        # DoRA's magnitudes train too: PEFT makes them parameters, and leaving them frozen
        # (as this did) trained a plain LoRA with the base's row norms beside it.
        is_lora = any(part in name for part in TRAINED_PARTS)
        param.requires_grad_(is_lora)
        if is_lora and param.dtype != torch.float32:
            # Train the adapter in fp32 even when the frozen base is half precision.
            param.data = param.data.float()
    return names


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for _, p in lora_named_parameters(model)]


def lora_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable LoRA parameters (lora_A, lora_B, DoRA's magnitudes) with their names."""
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def read_lora(model: torch.nn.Module, component: str) -> dict[str, LoraModule]:
    """The current LoRA weights of a model injected by `add_lora`, keyed by canonical name."""
    modules: dict[str, LoraModule] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            lora = LoraModule(
                lora_A=module.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone(),
                lora_B=module.lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone(),
                alpha=float(module.lora_alpha[ADAPTER_NAME]),
            )
            magnitudes = getattr(module, "lora_magnitude_vector", {})
            if ADAPTER_NAME in magnitudes:  # PEFT DoRA: one magnitude per output row
                rows = magnitudes[ADAPTER_NAME].weight.detach().float().cpu().clone()
                # (out,) for a Linear, (1, out, 1, 1) for a Conv2d: either way (out, 1, ...)
                lora = DoraModule(lora, rows.reshape(-1, *[1] * (lora.lora_A.dim() - 1)))
            modules[canonical_name(component, name)] = lora
    return modules


def base_weights(components: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """The frozen weight under each injected LoRA layer, keyed like `read_adapter_state`."""
    return {
        component: {canonical_name(component, name): module.get_base_layer().weight.detach()
                    for name, module in model.named_modules()
                    if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A}
        for component, model in components.items()
    }


def read_adapter_state(components: dict[str, torch.nn.Module], family: str) -> AdapterState:
    """Collect the LoRA weights of every injected component into one `AdapterState`."""
    modules = {comp: read_lora(model, comp) for comp, model in components.items()}
    return AdapterState(family=family, modules={c: m for c, m in modules.items() if m})


@contextlib.contextmanager
def uncast_inputs(models, active: bool = True) -> Iterator[None]:
    """PEFT casts each LoRA layer's input to the adapter's dtype (fp32) before the LoRA
    matmuls. Under autocast those matmuls run in bf16/fp16 anyway, so the cast round-trips
    exactly (outputs and gradients bit-identical: tests/test_inject.py) and the fp32 copies
    only cost memory: the full SD 1.5 at 512 px in bf16 peaked at 3.64 GiB without them
    against 3.82. Off while `active` (a training step under autocast, no dropout on the LoRA
    path: the caller decides). DoRA layers keep the cast: they compute weight norms in the
    input's dtype, so their result would change."""
    layers = [m for model in models for m in model.modules()
              if isinstance(m, LoraLayer) and not m.use_dora.get(ADAPTER_NAME, False)] if active else []
    before = [getattr(layer, "cast_input_dtype_enabled", True) for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.cast_input_dtype_enabled = value


@contextlib.contextmanager
def lora_weight(models, weight: float) -> Iterator[None]:
    """Scale every injected LoRA layer of `models` by `weight` (0: the base alone), then restore."""
    layers = [m for model in models for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.set_scale(ADAPTER_NAME, weight)
        if weight == 0:  # DoRA's trained magnitudes rescale W even with no LoRA delta: off
            layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_scale(ADAPTER_NAME, 1.0)
            layer.enable_adapters(True)
