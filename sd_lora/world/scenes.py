"""Scenes of the toy world, their captions, and drawing them in a style.

A scene is one or two groups of 1-3 identical shapes (kind and colour) on a plain background, each
shape in its own cell of a 3x3 grid: "two red circles and a yellow square on a blue background".
Everything is drawn from `random.Random(f"{seed}:{index}")` alone, so scene i is the same in
every style: a plain image and a styled one with the same seed and index differ only in the style.
Needs only Pillow.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

from sd_lora.world.shapes import COLOURS, Shape
from sd_lora.world.styles import Style

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
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    @property
    def groups(self) -> dict[tuple[str, str], int]:
        """(kind, colour) -> how many shapes of it, in drawing order."""
        counts: dict[tuple[str, str], int] = {}
        for shape in self.shapes:
            counts[(shape.kind, shape.colour)] = counts.get((shape.kind, shape.colour), 0) + 1
        return counts


def random_scene(rng: random.Random, max_groups: int = 2) -> Scene:
    """One (two times in three) or two groups of 1-3 identical shapes, each in its own cell.

    `max_groups=1` gives single-group scenes only (what the prompt-following score checks)."""
    background = rng.choice(list(COLOURS))
    n_groups = min(rng.choice((1, 1, 2)), max_groups)
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
    phrases = [
        f"{_count(n, colour)} {colour} {kind}{'s' if n > 1 else ''}"
        for (kind, colour), n in scene.groups.items()
    ]
    if len(scene.shapes) == 1:
        phrases[0] += " " + PLACES[scene.shapes[0].cell]
    return f"{' and '.join(phrases)} on {_count(1, scene.background)} {scene.background} background"


def _count(n: int, next_word: str) -> str:
    return "an" if n == 1 and next_word[0] in "aeiou" else COUNT_WORDS[n]


def render(scene: Scene, style: Style, size: int) -> Image.Image:
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), style.colour(scene.background))
    for shape in scene.shapes:
        style.draw_shape(canvas, shape, outline(shape, big))
    small = canvas.resize((size, size), Image.Resampling.LANCZOS)
    return style.finish(small)


def outline(shape: Shape, size: int) -> list[tuple[float, float]]:
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


def scene_at(index: int, seed: int, max_groups: int = 2) -> Scene:
    return random_scene(random.Random(f"{seed}:{index}"), max_groups)


def make_example(index: int, style: Style, size: int, seed: int) -> tuple[Image.Image, str]:
    scene = scene_at(index, seed)
    return render(scene, style, size), caption(scene, style)
