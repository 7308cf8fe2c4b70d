"""Does a blend of style adapters show every style? Style scores of generations with all the
trigger words, for the base alone, each adapter alone and all of them merged together.

The prompts are the same in every column (each carries every trigger word), so a change is the
adapters' doing, not the prompt's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sd_lora.apply import adapters_applied
from sd_lora.lora_state import AdapterState
from sd_lora.sampling import RenderSettings, render
from sd_lora.world.scorer import style_score
from sd_lora.world.styles import STYLES


@dataclass(frozen=True)
class BlendScores:
    styles: tuple[str, ...]
    prompts: tuple[str, ...]
    base: dict[str, float]  # style -> mean score without adapters
    alone: dict[str, dict[str, float]]  # adapter's style -> style -> mean score with it alone
    blend: dict[str, float]  # style -> mean score with every adapter merged

    def rise(self, style: str) -> float:
        """How much the blend raises `style`'s score over the base."""
        return round(self.blend[style] - self.base[style], 4)

    def as_dict(self) -> dict:
        return {"styles": list(self.styles), "prompts": list(self.prompts), "base": self.base,
                "alone": self.alone, "blend": self.blend,
                "rise": {s: self.rise(s) for s in self.styles}}


def blend_prompts(styles: Sequence[str], captions: Sequence[str]) -> list[str]:
    """Each caption after every style's trigger word ("zkpastel, zkstripes, a red circle ...")."""
    triggers = ", ".join(STYLES[s].trigger for s in styles)
    return [f"{triggers}, {caption}" for caption in captions]


def measure_blend(
    pipe,
    adapters: Sequence[tuple[str, AdapterState, float]],  # (style, adapter, strength)
    captions: Sequence[str],
    *,
    steps: int = 20,
    guidance_scale: float = 7.0,
    resolution: int = 64,
    first_seed: int = 100,
) -> BlendScores:
    """Mean style scores of one generation per caption (seeds first_seed, first_seed + 1, ...)."""
    styles = tuple(style for style, _, _ in adapters)
    prompts = blend_prompts(styles, captions)

    def scores() -> dict[str, float]:
        images = [
            render(pipe, RenderSettings(prompt=p, seed=first_seed + i, steps=steps,
                                        guidance_scale=guidance_scale, width=resolution,
                                        height=resolution))
            for i, p in enumerate(prompts)
        ]
        return {s: round(float(np.mean([style_score(im, s) for im in images])), 4) for s in styles}

    base = scores()
    alone = {}
    for style, state, strength in adapters:
        with adapters_applied(pipe, [(state, strength, strength)]):
            alone[style] = scores()
    with adapters_applied(pipe, [(state, strength, strength) for _, state, strength in adapters]):
        blend = scores()
    return BlendScores(styles, tuple(prompts), base, alone, blend)
