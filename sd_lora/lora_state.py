"""The in-memory form of an adapter, independent of any file format.

Every reader produces an `AdapterState` and every writer consumes one, so format conversions are
pure functions between a file's tensors and this structure (see `sd_lora.formats`).

Names use PEFT's vocabulary: `lora_A` is the down projection (r, in), `lora_B` the up projection
(out, r). Module paths are the diffusers/transformers module names of the component, with the
canonical `text_model.` level kept for CLIP text encoders (transformers 5 drops it from its own
module names; every community LoRA file has it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The pipeline attribute each component lives under; the same strings key `AdapterState.modules`.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass
class LoraModule:
    """One adapted layer: W' = W + strength * (alpha / r) * lora_B @ lora_A."""

    lora_A: torch.Tensor  # (r, in) for Linear, (r, in, kh, kw) for Conv2d
    lora_B: torch.Tensor  # (out, r) for Linear, (out, r, 1, 1) for Conv2d
    alpha: float

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r: the one place this ratio is computed."""
        return float(self.alpha) / self.r

    def delta(self, strength: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight change this module applies, shaped like the base layer's weight."""
        down = self.lora_A.to(dtype)
        up = self.lora_B.to(dtype)
        if down.dim() == 2:
            product = up @ down  # (out, in)
        else:  # conv: (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
            product = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return product * (strength * self.scale)


@dataclass
class AdapterState:
    """All LoRA modules of one adapter, keyed by component then module path."""

    family: str  # one of FAMILIES
    modules: dict[str, dict[str, LoraModule]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown base family {self.family!r}; expected one of {FAMILIES}")
        unknown = set(self.modules) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; expected {COMPONENTS}")

    def count(self) -> int:
        return sum(len(m) for m in self.modules.values())

    def ranks(self) -> set[int]:
        return {m.r for comp in self.modules.values() for m in comp.values()}

    def alphas(self) -> set[float]:
        return {float(m.alpha) for comp in self.modules.values() for m in comp.values()}
