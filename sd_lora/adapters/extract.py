"""The weight differences between a base and a fine-tuned model, layer by layer, for
`transforms.from_differences` (`sd-lora extract`). The layers are those LoRA trains (every
target group of `inject`), plus, with `conv`, the ResNet and resampling 3x3 convolutions
(LoCon's layers)."""

from __future__ import annotations

import torch

from sd_lora.adapters.transforms import TransformError
from sd_lora.choices import TARGET_GROUPS
from sd_lora.formats.adapter_state import COMPONENTS, canonical_name
from sd_lora.lora.inject import target_module_names, target_suffixes
from sd_lora.models.families import model_family

CONV_PARTS = ("resnets", "downsamplers", "upsamplers")


def extracted_layers(component: str, model: torch.nn.Module, conv: bool) -> list[str]:
    names = target_module_names(model, target_suffixes(component, tuple(TARGET_GROUPS[component])))
    if conv and component == "unet":
        names += [n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (3, 3)
                  and any(f".{part}." in f".{n}." for part in CONV_PARTS)]
    return names


def weight_differences(base, tuned, conv: bool = False) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """(family, {component: {canonical module path: tuned weight - base weight}}), in float32."""
    family, other = model_family(base), model_family(tuned)
    if family != other:
        raise TransformError(f"the base is {family} and the tuned model {other}: extract needs "
                             "two models of the same architecture")
    differences: dict[str, dict[str, torch.Tensor]] = {}
    for component in COMPONENTS:
        a, b = getattr(base, component, None), getattr(tuned, component, None)
        if a is None or b is None:
            continue
        b_modules = dict(b.named_modules())
        for name in extracted_layers(component, a, conv):
            wa, wb = a.get_submodule(name).weight, b_modules[name].weight
            if wa.shape != wb.shape:
                raise TransformError(f"{component} {name}: {tuple(wa.shape)} in the base but "
                                     f"{tuple(wb.shape)} in the tuned model")
            delta = wb.detach().float() - wa.detach().float()
            differences.setdefault(component, {})[canonical_name(component, name)] = delta
    return family, differences
