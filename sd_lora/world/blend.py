"""Does a blend of style adapters show every style? Style scores of generations with all the
trigger words, for the base alone, each adapter alone and all of them merged together.

The prompts are the same in every column (each carries every trigger word), so a change is the
adapters' doing, not the prompt's.

    python -m sd_lora.world.blend runs/pastel/pastel.safetensors runs/golden/golden.safetensors \
        --strength 0.7 --grid blend.png

prints the scores as JSON and draws a grid: one row per column (base, each adapter alone, the
blend), one picture per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sd_lora.adapters.apply import adapters_applied
from sd_lora.formats.adapter_state import AdapterState
from sd_lora.generate.render import RenderSettings, render
from sd_lora.world.scorer import style_score
from sd_lora.world.styles import STYLES


@dataclass(frozen=True)
class BlendScores:
    styles: tuple[str, ...]
    prompts: tuple[str, ...]
    base: dict[str, float]  # style -> mean score without adapters
    alone: dict[str, dict[str, float]]  # adapter's style -> style -> mean score with it alone
    blend: dict[str, float]  # style -> mean score with every adapter merged
    # row label ("base", "pastel 0.7", ..., "pastel 0.7 + golden 0.7") -> one image per prompt
    images: dict[str, list] = field(default_factory=dict, repr=False, compare=False)

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

    images: dict[str, list] = {}

    def scores(label: str) -> dict[str, float]:
        images[label] = [
            render(pipe, RenderSettings(prompt=p, seed=first_seed + i, steps=steps,
                                        guidance_scale=guidance_scale, width=resolution,
                                        height=resolution))
            for i, p in enumerate(prompts)
        ]
        return {s: round(float(np.mean([style_score(im, s) for im in images[label]])), 4)
                for s in styles}

    base = scores("base")
    alone = {}
    for style, state, strength in adapters:
        with adapters_applied(pipe, [(state, strength, strength)]):
            alone[style] = scores(f"{style} {strength:g}")
    with adapters_applied(pipe, [(state, strength, strength) for _, state, strength in adapters]):
        blend = scores(" + ".join(f"{style} {strength:g}" for style, _, strength in adapters))
    return BlendScores(styles, tuple(prompts), base, alone, blend, images)


def blend_grid(scores: BlendScores, cell: int = 128):
    """The generations as one picture: a row per column of `scores`, labelled on its first."""
    from PIL import Image

    from sd_lora.generate.render import image_grid

    pictures, labels = [], []
    for label, row in scores.images.items():
        pictures += [im.resize((cell, cell), Image.Resampling.NEAREST) for im in row]
        labels += [label] + [""] * (len(row) - 1)
    return image_grid(pictures, columns=len(scores.prompts), labels=labels)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    from sd_lora.adapters.files import load_adapter
    from sd_lora.models.load import load_pipeline
    from sd_lora.util.atomic import atomic_path

    parser = argparse.ArgumentParser(prog="python -m sd_lora.world.blend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+",
                        help="toy-style adapter files, as STYLE=FILE or FILE (the style is then "
                             "read from the trigger word in its metadata)")
    parser.add_argument("--strength", type=float, default=0.7, help="every adapter's strength")
    parser.add_argument("--captions", type=Path, default=Path("datasets/toy/heldout/plain"),
                        help="folder of .txt captions (default: the toy world's held-out plain scenes)")
    parser.add_argument("--prompts", type=int, default=8, help="how many of its captions to use")
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--grid", type=Path, help="write the generations here (PNG)")
    args = parser.parse_args(argv)

    adapters = []
    for item in args.adapters:
        style, _, path = item.rpartition("=")
        state = load_adapter(path)
        if style and style not in STYLES:
            raise SystemExit(f"{item}: unknown style {style!r}; toy styles: {', '.join(STYLES)}")
        adapters.append((style or style_of(state, path), state, args.strength))
    captions = [p.read_text().strip() for p in sorted(args.captions.glob("*.txt"))]
    if not captions:
        raise SystemExit(f"{args.captions}: no .txt captions there; pass --captions FOLDER")
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    scores = measure_blend(pipe, adapters, captions[: args.prompts], first_seed=args.first_seed)
    print(json.dumps(scores.as_dict(), indent=2))
    if args.grid:
        with atomic_path(args.grid) as tmp:
            blend_grid(scores).save(tmp, format="PNG")
        print(f"grid: {args.grid}")
    return 0


def style_of(state: AdapterState, path) -> str:
    """The toy style whose trigger word the adapter was trained with (its metadata's tags)."""
    tags = (state.metadata or {}).get("ss_tag_frequency", "")
    found = [s for s in STYLES if STYLES[s].trigger and STYLES[s].trigger in tags]
    if len(found) != 1:
        raise SystemExit(f"{path}: cannot tell which toy style this adapter is (trigger words "
                         f"found in its ss_tag_frequency metadata: {found or 'none'})")
    return found[0]


if __name__ == "__main__":
    raise SystemExit(main())
