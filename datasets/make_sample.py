"""Generate a small captioned dataset of simple scenes: coloured shapes on a coloured background.

    python datasets/make_sample.py --style stripes            # -> datasets/sample_stripes/
    python datasets/make_sample.py --style plain --count 64 --size 64 --out /tmp/plain

Each image is drawn from `random.Random(f"{seed}:{index}")` alone, so image i is the same scene
in every style: `plain` and `stripes` with one seed are pairs that differ only in the style.
A style changes how shapes are drawn (and may recolour or post-process the picture); its trigger
word starts the caption: "zkstripes, two red circles and a yellow square on a blue background".

Needs only Pillow. The output is ours, released under CC0 (see datasets/README.md).
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "orange": (245, 130, 30),
    "yellow": (240, 205, 40),
    "green": (46, 150, 70),
    "blue": (40, 90, 200),
    "purple": (125, 60, 170),
    "pink": (240, 130, 175),
    "white": (245, 245, 240),
    "black": (30, 30, 30),
}
KINDS = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# A 3x3 grid of cells, (row, column) -> the phrase for a shape alone in that cell.
PLACES = {
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}  # fmt: skip
SUPERSAMPLE = 4  # draw at 4x and downsample, for smooth edges


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # a key of COLOURS
    cell: tuple[int, int]  # (row, column) in the 3x3 grid
    radius: float  # fraction of a cell
    offset: tuple[float, float]  # centre shift, fraction of a cell


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]


def random_scene(rng: random.Random) -> Scene:
    """One or two groups of 1-3 identical shapes (kind and colour), each shape in its own cell."""
    background = rng.choice(list(COLOURS))
    n_groups = rng.choice((1, 1, 2))
    kinds_colours: list[tuple[str, str]] = []
    while len(kinds_colours) < n_groups:
        pair = (rng.choice(KINDS), rng.choice([c for c in COLOURS if c != background]))
        if pair not in kinds_colours:
            kinds_colours.append(pair)
    counts = [rng.randint(1, 3) for _ in kinds_colours]
    cells = rng.sample(sorted(PLACES), sum(counts))
    shapes = []
    for (kind, colour), count in zip(kinds_colours, counts):
        for _ in range(count):
            offset = (rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08))
            shapes.append(Shape(kind, colour, cells.pop(), rng.uniform(0.32, 0.42), offset))
    return Scene(background, tuple(shapes))


def describe(scene: Scene) -> str:
    """'two red circles and a yellow square on a blue background' (a lone shape gets its place)."""
    groups: dict[tuple[str, str], int] = {}
    for shape in scene.shapes:
        groups[(shape.kind, shape.colour)] = groups.get((shape.kind, shape.colour), 0) + 1
    phrases = [
        f"{_count(n, colour)} {colour} {kind}{'s' if n > 1 else ''}"
        for (kind, colour), n in groups.items()
    ]
    if len(scene.shapes) == 1:
        phrases[0] += " " + PLACES[scene.shapes[0].cell]
    return f"{' and '.join(phrases)} on {_count(1, scene.background)} {scene.background} background"


def _count(n: int, next_word: str) -> str:
    return "an" if n == 1 and next_word[0] in "aeiou" else COUNT_WORDS[n]


class Style:
    """How a scene is drawn. `plain` is this base class; a style overrides some of the hooks."""

    name = "plain"
    trigger: str | None = None  # the word that starts every caption of this style

    def colour(self, name: str) -> tuple[int, int, int]:
        return COLOURS[name]

    def draw_shape(
        self, canvas: Image.Image, shape: Shape, outline: list[tuple[float, float]]
    ) -> None:
        ImageDraw.Draw(canvas).polygon(outline, fill=self.colour(shape.colour))

    def finish(self, image: Image.Image) -> Image.Image:
        return image


class Stripes(Style):
    """Shapes filled with diagonal stripes: the shape's colour and a lighter (or darker) band."""

    name = "stripes"
    trigger = "zkstripes"
    period = 0.09  # of the image width
    band = 0.4  # fraction of a period drawn in the second colour

    def draw_shape(
        self, canvas: Image.Image, shape: Shape, outline: list[tuple[float, float]]
    ) -> None:
        base = self.colour(shape.colour)
        light = sum(base) / 3 > 150
        band = tuple(round(c * 0.45) if light else round(c + (255 - c) * 0.65) for c in base)
        size = canvas.width
        pattern = Image.new("RGB", canvas.size, base)
        draw = ImageDraw.Draw(pattern)
        step = max(2, round(self.period * size))
        for x in range(-size, size, step):  # 45-degree lines from the top edge down to the right
            draw.line([(x, 0), (x + size, size)], fill=band, width=max(1, round(step * self.band)))
        mask = Image.new("L", canvas.size, 0)
        ImageDraw.Draw(mask).polygon(outline, fill=255)
        canvas.paste(pattern, (0, 0), mask)


STYLES: dict[str, Style] = {style.name: style for style in (Style(), Stripes())}


def render(scene: Scene, style: Style, size: int) -> Image.Image:
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), style.colour(scene.background))
    for shape in scene.shapes:
        style.draw_shape(canvas, shape, _outline(shape, big))
    small = canvas.resize((size, size), Image.Resampling.LANCZOS)
    return style.finish(small)


def _outline(shape: Shape, size: int) -> list[tuple[float, float]]:
    """The shape's outline as a polygon in pixels (a circle as a 96-gon)."""
    cell = size / 3
    cx = (shape.cell[1] + 0.5 + shape.offset[0]) * cell
    cy = (shape.cell[0] + 0.5 + shape.offset[1]) * cell
    r = shape.radius * cell
    if shape.kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape.kind == "triangle":  # upright, equilateral, centred on its centroid
        return [(cx, cy - r * 1.15), (cx + r, cy + r * 0.58), (cx - r, cy + r * 0.58)]
    return [
        (cx + r * math.cos(a), cy + r * math.sin(a)) for a in (i * math.tau / 96 for i in range(96))
    ]


def caption(scene: Scene, style: Style) -> str:
    text = describe(scene)
    return f"{style.trigger}, {text}" if style.trigger else text


def make_example(index: int, style: Style, size: int, seed: int) -> tuple[Image.Image, str]:
    scene = random_scene(random.Random(f"{seed}:{index}"))
    return render(scene, style, size), caption(scene, style)


def write_dataset(out: Path, style: Style, count: int, size: int, seed: int) -> None:
    """Write NNNN.png + NNNN.txt pairs into `out` (created; must be empty or hold only such pairs)."""
    out.mkdir(parents=True, exist_ok=True)
    ours = [p for p in out.iterdir() if re.fullmatch(r"\d{4}\.(png|txt)", p.name)]
    others = sorted(p.name for p in out.iterdir() if p not in ours)
    if others:
        raise SystemExit(
            f"{out} holds files this script did not write ({others[:5]}); choose another --out"
        )
    for old in ours:  # a previous run's output, possibly with a larger --count
        old.unlink()
    for i in range(count):
        image, text = make_example(i, style, size, seed)
        image.save(out / f"{i:04d}.png", optimize=True)
        (out / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--style", choices=sorted(STYLES), default="plain")
    parser.add_argument("--count", type=int, default=16, help="number of images (default 16)")
    parser.add_argument(
        "--size", type=int, default=128, help="width = height in pixels (default 128)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output folder (default datasets/sample_<style>)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.size < 8:
        parser.error(f"--count must be >= 1 and --size >= 8 (got {args.count}, {args.size})")
    out = args.out or Path(__file__).resolve().parent / f"sample_{args.style}"
    write_dataset(out, STYLES[args.style], args.count, args.size, args.seed)
    print(f"wrote {args.count} {args.style} images ({args.size}x{args.size}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
