"""An adapter and the strengths it is used at: the one type for "this adapter, this strong".

Kept free of torch and diffusers: the CLI's argument parsing and the app's forms make these.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from sd_lora.adapters.block_weights import block_weight

Source = TypeVar("Source")


@dataclass(frozen=True)
class AdapterUse(Generic[Source]):
    """An adapter and the strengths it is used at: the one type for "this adapter, this strong",
    from a `--lora` argument (`adapter` a file path) or an app request (a name in the adapters
    folder) to the loaded state that `apply_adapters` merges (an `AdapterState`): each step
    swaps `adapter` (`loaded`) and keeps the strengths."""

    adapter: Source
    unet: float = 1.0  # A1111's UNet multiplier (SD3: the transformer's)
    text_encoder: float = 1.0  # A1111's text-encoder multiplier (both of SDXL's encoders)
    blocks: tuple[float, ...] | None = None  # LBW: 17 (or 26) weights, BASE first; None: all 1
    name: str | None = None  # in messages, tags and PNG parameters

    def loaded(self, state) -> AdapterUse:
        """The same use of the loaded adapter (an `AdapterState`)."""
        return replace(self, adapter=state)

    def label(self, index: int) -> str:
        meta = getattr(self.adapter, "metadata", None) or {}  # a loaded state's file metadata
        return (
            self.name
            or meta.get("ss_output_name")
            or meta.get("modelspec.title")
            or f"adapter #{index}"
        )

    def strength(self, component: str) -> float:
        """`text_encoder` for every text encoder, `unet` for the denoiser: the UNet, or SD3's
        transformer (A1111 and ComfyUI apply their UNet multiplier to it)."""
        return float(self.text_encoder if component.startswith("text_encoder") else self.unet)

    def module_strength(self, component: str, path: str) -> float:
        """The component's strength times the module's block weight (when block weights are set)."""
        strength = self.strength(component)
        if self.blocks is None:
            return strength
        return strength * block_weight(self.blocks, component, path)
