"""sd-scripts' three LoRA dropouts, on the PEFT layers `sd_lora.lora.inject.add_lora` makes.

PEFT has one dropout, on each adapted layer's input (`lora.dropout`). sd-scripts' LoRA has three
more, each on the adapter's own path, and users carry them over in their recipes:

- `network_dropout`: element-wise dropout on the rank-r hidden state (the down projection's
  output), kept values scaled by 1 / (1 - p);
- `rank_dropout`: per sample, whole rank dimensions are dropped (the same ones at every token or
  pixel of that sample), and the delta is scaled by 1 / (1 - p);
- `module_dropout`: per forward pass, a module's whole delta is left out with probability p
  (not rescaled), so that module sees the base alone for that step.

They act in training mode only; evaluation, validation, sample images and exports see the plain
adapter. They are forward hooks on PEFT's `lora_A` / `lora_B` submodules, drawn from torch's
generators (the CPU's and the layer's device's, both saved in checkpoints, so a resumed run
repeats its draws; gradient checkpointing restores them when it recomputes, so recomputed draws
agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from sd_lora.lora.inject import ADAPTER_NAME


@dataclass(frozen=True)
class AdapterDropouts:
    network: float = 0.0  # element-wise, on the rank-r hidden state
    rank: float = 0.0  # whole rank dimensions, per sample
    module: float = 0.0  # the whole module's delta, per forward pass

    @property
    def any(self) -> bool:
        return bool(self.network or self.rank or self.module)


def _drop_hidden(dropouts: AdapterDropouts):
    def hook(module: torch.nn.Module, args, hidden: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return hidden
        if dropouts.network:
            hidden = torch.nn.functional.dropout(hidden, p=dropouts.network, training=True)
        if dropouts.rank:
            # One keep/drop per (sample, rank dimension): broadcast over tokens (linear layers
            # see (batch, tokens, r)) or pixels (convolutions see (batch, r, h, w)).
            batch, rank = hidden.shape[0], hidden.shape[1 if hidden.dim() == 4 else -1]
            keep = torch.rand(batch, rank, device=hidden.device) >= dropouts.rank
            if hidden.dim() == 3:
                keep = keep[:, None, :]
            elif hidden.dim() == 4:
                keep = keep[:, :, None, None]
            hidden = hidden * keep.to(hidden.dtype) / (1.0 - dropouts.rank)
        return hidden

    return hook


def _drop_module(probability: float):
    def hook(module: torch.nn.Module, args, delta: torch.Tensor) -> torch.Tensor:
        # Drawn on the CPU (as sd-scripts does): a device draw would sync the GPU at every layer.
        if module.training and float(torch.rand(1)) < probability:
            return delta * 0.0  # keeps the graph (and DDP's view of every parameter) intact
        return delta

    return hook


def add_dropouts(models: dict[str, torch.nn.Module], dropouts: AdapterDropouts) -> int:
    """Hook the dropouts onto every injected LoRA layer of `models`; returns how many layers."""
    if not dropouts.any:
        return 0
    layers = [m for model in models.values() for m in model.modules()
              if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A]
    for layer in layers:
        if dropouts.network or dropouts.rank:
            layer.lora_A[ADAPTER_NAME].register_forward_hook(_drop_hidden(dropouts))
        if dropouts.module:
            layer.lora_B[ADAPTER_NAME].register_forward_hook(_drop_module(dropouts.module))
    return len(layers)
