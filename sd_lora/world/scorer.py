"""Read a toy-world picture back: its background, its shapes' colours, kinds and count, and how
strongly it shows each style. Plain numpy on RGB pixels; no learned model, so a score means the
same thing on every machine and for every checkpoint.

- `read_picture(image)`: background = the median border colour; shapes = connected regions that
  differ from it, each with its nearest palette colour and a kind from how much of its bounding
  box it fills (square ~1, circle ~0.79, upright triangle ~0.5).
- `style_statistic(image, style)`: one number per style, defined from how the style is drawn
  (`sd_lora.world.styles`); `style_score` rescales it so that plain renders average 0 and renders
  in that style average 1 (calibrated on held-out renders).
- `prompt_following_accuracy(pipe)`: generate single-group scenes from their captions and check
  what comes back.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sd_lora.models.builtin.toy import TOY_BASE_NAME
from sd_lora.train.report import StyleScorer
from sd_lora.world.scenes import caption, render, scene_at
from sd_lora.world.shapes import COLOURS
from sd_lora.world.styles import GOLD, PIXEL_BLOCKS, SEPIA_TINT, STYLES, TOY_STYLES, Stripes

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as a shape
MIN_SHAPE_AREA = 0.004  # of the image; smaller regions are noise
PALETTE_NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[n] for n in PALETTE_NAMES], dtype=np.float32)
CALIBRATION_SEED = 7  # scenes for calibrating style scores, apart from every dataset's


@dataclass(frozen=True)
class ShapeReading:
    colour: str
    kind: str
    area: float  # fraction of the image
    fill: float  # area / bounding-box area


@dataclass(frozen=True)
class PictureReading:
    background: str
    shapes: tuple[ShapeReading, ...]  # largest first

    @property
    def main(self) -> ShapeReading | None:
        return self.shapes[0] if self.shapes else None


def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 255]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float32)


def nearest_colour(rgb: np.ndarray) -> str:
    return PALETTE_NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def background_colour(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    return np.median(border, axis=0)


def foreground_mask(pixels: np.ndarray) -> np.ndarray:
    distance = np.sqrt(((pixels - background_colour(pixels)) ** 2).sum(axis=2))
    return distance > FOREGROUND_DISTANCE


def regions(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of `mask`, each as an (n, 2) array of (row, col), largest first."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, cells = deque([start]), []
        while queue:
            r, c = queue.popleft()
            cells.append((r, c))
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        found.append(np.array(cells))
    return sorted(found, key=len, reverse=True)


def kind_from_fill(fill: float) -> str:
    if fill > 0.88:
        return "square"
    if fill < 0.64:
        return "triangle"
    return "circle"


def read_picture(image: Image.Image | np.ndarray) -> PictureReading:
    pixels = as_array(image)
    total = pixels.shape[0] * pixels.shape[1]
    shapes = []
    for cells in regions(foreground_mask(pixels)):
        if len(cells) < MIN_SHAPE_AREA * total:
            break
        rows, cols = cells[:, 0], cells[:, 1]
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        colour = np.median(pixels[rows, cols], axis=0)
        fill = len(cells) / box
        shapes.append(
            ShapeReading(nearest_colour(colour), kind_from_fill(fill), len(cells) / total, fill)
        )
    return PictureReading(nearest_colour(background_colour(pixels)), tuple(shapes))


# --- styles -----------------------------------------------------------------------------------


def _luminance(pixels: np.ndarray) -> np.ndarray:
    return pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def stripes_statistic(pixels: np.ndarray) -> float:
    """Share of the non-constant spectrum at the stripes' frequency and 45-degree orientation."""
    lum = _luminance(pixels)
    size = lum.shape[0]
    power = np.abs(np.fft.fft2(lum - lum.mean())) ** 2
    freq = np.fft.fftfreq(size)
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    # Stripes run along (1, 1), so brightness varies along (1, -1) with period `period` in x.
    wanted = 1.0 / (Stripes.period * size)
    near = np.hypot(np.abs(fx) - wanted, np.abs(fy) - wanted) < 1.5 / size
    near &= np.sign(fx) != np.sign(fy)
    return float(power[near].sum() / max(power.sum(), 1e-9))


def pastel_statistic(pixels: np.ndarray) -> float:
    """Mean of each pixel's darkest channel: pale colours have no dark channel."""
    return float(pixels.min(axis=2).mean() / 255.0)


def outline_statistic(pixels: np.ndarray) -> float:
    """Share of the foreground that is edge: filled shapes have an inside, outlines do not."""
    mask = foreground_mask(pixels)
    if mask.sum() == 0:
        return 0.0
    inside = mask.copy()
    for shift in (1, 2):
        inside[shift:] &= mask[:-shift]
        inside[:-shift] &= mask[shift:]
        inside[:, shift:] &= mask[:, :-shift]
        inside[:, :-shift] &= mask[:, shift:]
    return float(1.0 - inside.sum() / mask.sum())


def pixel_statistic(pixels: np.ndarray) -> float:
    """Share of the brightness steps that fall on the pixel-art block grid (~0.25 if unrelated)."""
    lum = _luminance(pixels)
    block = lum.shape[0] / PIXEL_BLOCKS
    steps_x = np.abs(np.diff(lum, axis=1))
    steps_y = np.abs(np.diff(lum, axis=0))
    on_grid = (np.arange(1, lum.shape[0]) % block) < 1  # the step into a new block
    grid_energy = steps_x[:, on_grid].sum() + steps_y[on_grid, :].sum()
    return float(grid_energy / max(steps_x.sum() + steps_y.sum(), 1e-9))


def sepia_statistic(pixels: np.ndarray) -> float:
    """How close each pixel is to its luminance times the sepia tint (1 = exactly sepia)."""
    expected = _luminance(pixels)[..., None] * np.array(SEPIA_TINT, dtype=np.float32)
    return float(1.0 - np.abs(pixels - expected).mean() / 255.0)


GRADE_RIDGE = 100.0  # squared RGB distance charged for a full mix: ties go to the plainer reading


def colour_grades(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whiteness, goldness) of each pixel: the weights p, g >= 0 (p + g <= 1) of the reading
    pixel = c + p (white - c) + g (gold - c) that is nearest to it, over the world's plain
    colours c. Pastel is p = PASTEL_MIX, golden g = GOLDEN_MIX, and the two grades applied one
    after the other are both in this family (golden then pastel: p 0.55, g 0.2), so each grade
    is read whatever the other did. A pixel nearer to the sepia line (luminance times the tint)
    than to every reading has neither."""
    rgb = pixels.reshape(-1, 3).astype(np.float32)
    white = np.full(3, 255.0, dtype=np.float32)
    gold = np.array(GOLD, dtype=np.float32)
    best_cost = np.full(len(rgb), np.inf, dtype=np.float32)
    whiteness = np.zeros(len(rgb), dtype=np.float32)
    goldness = np.zeros(len(rgb), dtype=np.float32)
    for plain in PALETTE:
        to_white, to_gold, rest = white - plain, gold - plain, rgb - plain
        ww, gg = to_white @ to_white + GRADE_RIDGE, to_gold @ to_gold + GRADE_RIDGE
        wg, rw, rg = to_white @ to_gold, rest @ to_white, rest @ to_gold
        det = ww * gg - wg * wg
        zero = np.zeros_like(rw)
        # The ridge least-squares optimum under p, g >= 0 is the free optimum, one weight alone,
        # or none: try all four, each clipped to the allowed range.
        for p, g in (((gg * rw - wg * rg) / det, (ww * rg - wg * rw) / det),
                     (rw / ww, zero), (zero, rg / gg), (zero, zero)):
            p, g = np.clip(p, 0.0, 1.0), np.clip(g, 0.0, 1.0)
            total = np.maximum(p + g, 1.0)
            p, g = p / total, g / total
            fit = plain + p[:, None] * to_white + g[:, None] * to_gold
            cost = ((rgb - fit) ** 2).sum(axis=1) + GRADE_RIDGE * (p * p + g * g)
            better = cost < best_cost
            best_cost[better], whiteness[better], goldness[better] = cost[better], p[better], g[better]
    tint = np.array(SEPIA_TINT, dtype=np.float32)
    along = (rgb @ tint) / (tint @ tint)
    sepia = ((rgb - along[:, None] * tint) ** 2).sum(axis=1) < best_cost
    whiteness[sepia], goldness[sepia] = 0.0, 0.0
    return whiteness, goldness


def golden_statistic(pixels: np.ndarray) -> float:
    """Mean goldness (`colour_grades`): how far the colours moved towards gold. (A pixel's
    warmth alone mostly says which colours a scene has. An earlier statistic, the share of
    pixels nearest a golden colour, read a golden image made pastel as not golden at all.)"""
    return float(colour_grades(pixels)[1].mean())


STATISTICS = {
    "stripes": stripes_statistic,
    "pastel": pastel_statistic,
    "outline": outline_statistic,
    "pixel": pixel_statistic,
    "sepia": sepia_statistic,
    "golden": golden_statistic,
}


def style_statistic(image, style: str) -> float:
    if style not in STATISTICS:
        raise ValueError(f"no style statistic for {style!r}; known: {sorted(STATISTICS)}")
    return STATISTICS[style](as_array(image))


@functools.cache
def calibration(style: str, size: int = 64, count: int = 96) -> tuple[float, float]:
    """Mean statistic of plain renders and of renders in `style` (held-out scenes)."""
    means = []
    for drawn_in in ("plain", style):
        values = [
            style_statistic(render(scene_at(i, CALIBRATION_SEED), STYLES[drawn_in], size), style)
            for i in range(count)
        ]
        means.append(float(np.mean(values)))
    return means[0], means[1]


def style_score(image, style: str) -> float:
    """0 = like the plain world, 1 = like renders in `style` (may leave [0, 1])."""
    pixels = as_array(image)
    plain, styled = calibration(style, pixels.shape[0])
    return (STATISTICS[style](pixels) - plain) / (styled - plain)


def toy_style_scorer() -> StyleScorer:
    """The quality report's scorer for the toy base's styles, each found by its trigger word."""
    return StyleScorer(TOY_BASE_NAME, {STYLES[name].trigger: name for name in TOY_STYLES},
                       style_score)


# --- prompt following ------------------------------------------------------------------------


def judge(reading: PictureReading, scene) -> dict[str, bool]:
    """Did the picture get the (single-group) scene's background, colour, shape and count?"""
    (kind, colour), count = next(iter(scene.groups.items()))
    main = reading.main
    return {
        "background": reading.background == scene.background,
        "colour": main is not None and main.colour == colour,
        "shape": main is not None and main.kind == kind,
        "count": len(reading.shapes) == count,
    }


def prompt_following_accuracy(
    pipe, count: int = 90, seed: int = 11, steps: int = 20, guidance_scale: float = 5.0,
    prefix: str = "",
) -> dict:
    """Generate `count` single-group scenes from their captions; the share of each aspect right.

    `prefix` goes before every caption: words the base never saw, such as two style adapters'
    trigger words ("zkpastel, zkgolden, "), must not change what it draws."""
    from sd_lora.generate.render import RenderSettings
    from sd_lora.generate.render import render as generate

    scenes = [scene_at(i, seed, max_groups=1) for i in range(count)]
    marks = []
    for i, scene in enumerate(scenes):
        image = generate(
            pipe,
            RenderSettings(
                prompt=prefix + caption(scene, STYLES["plain"]),
                seed=i,
                steps=steps,
                guidance_scale=guidance_scale,
                width=64,
                height=64,
            ),
        )
        marks.append(judge(read_picture(image), scene))
    result = {aspect: round(float(np.mean([m[aspect] for m in marks])), 3) for aspect in marks[0]}
    result["colour_and_shape"] = round(
        float(np.mean([m["colour"] and m["shape"] for m in marks])), 3
    )
    result["prompts"] = count
    return result
