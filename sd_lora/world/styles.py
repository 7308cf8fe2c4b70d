"""The styles a toy-world scene can be drawn in. Each is defined exactly (a palette mapping, a
fill pattern or a post-process), so `sd_lora.world.scorer` can measure it back from an image.

`plain` is the world the toy base was pretrained on; every other style has a made-up trigger word
that starts its captions ("zkpastel, a red circle on a blue background") and that the base has
never seen, which is what a style LoRA has to learn.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from sd_lora.world.shapes import COLOURS, Shape

SEPIA_TINT = (1.0, 0.85, 0.66)  # a sepia pixel is its luminance times this
PASTEL_MIX = 0.55  # a pastel colour is this far from the plain colour towards white
PIXEL_BLOCKS = 8  # a pixelated image is this many blocks across
GOLD = (235, 165, 40)  # a golden colour is GOLDEN_MIX of the way from the plain colour to this
GOLDEN_MIX = 0.45


class Style:
    """How a scene is drawn. `plain` is this base class; a style overrides some of the hooks."""

    name = "plain"
    trigger: str | None = None  # the word that starts every caption of this style
    description = "flat shapes in saturated colours (the world the toy base was trained on)"

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
    description = "shapes filled with diagonal stripes"
    # Of the image width: 10 px at 64 px, coarse enough for the toy VAE's 16x16 latents to hold
    # (finer diagonal stripes are above their Nyquist frequency and come back as a blur).
    period = 0.16
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


class Pastel(Style):
    """Every colour, background included, mixed halfway towards white."""

    name = "pastel"
    trigger = "zkpastel"
    description = "a pale pastel palette"

    def colour(self, name: str) -> tuple[int, int, int]:
        return tuple(round(c + (255 - c) * PASTEL_MIX) for c in COLOURS[name])


class Outline(Style):
    """Shapes drawn as outlines only: the inside shows the background."""

    name = "outline"
    trigger = "zkoutline"
    description = "shapes drawn as outlines"
    width = 0.035  # of the image width

    def draw_shape(
        self, canvas: Image.Image, shape: Shape, outline: list[tuple[float, float]]
    ) -> None:
        width = max(1, round(self.width * canvas.width))
        ImageDraw.Draw(canvas).line(
            outline + outline[:1], fill=self.colour(shape.colour), width=width, joint="curve"
        )


class Pixel(Style):
    """The picture pixelated: averaged into PIXEL_BLOCKS x PIXEL_BLOCKS square blocks."""

    name = "pixel"
    trigger = "zkpixel"
    description = f"pixel art ({PIXEL_BLOCKS}x{PIXEL_BLOCKS} blocks)"

    def finish(self, image: Image.Image) -> Image.Image:
        small = image.resize((PIXEL_BLOCKS, PIXEL_BLOCKS), Image.Resampling.BOX)
        return small.resize(image.size, Image.Resampling.NEAREST)


class Sepia(Style):
    """The picture in sepia: each pixel's luminance times a warm brown tint."""

    name = "sepia"
    trigger = "zksepia"
    description = "sepia tone"

    def finish(self, image: Image.Image) -> Image.Image:
        luminance = image.convert("L")
        channels = [luminance.point(lambda v, t=t: round(v * t)) for t in SEPIA_TINT]
        return Image.merge("RGB", channels)


class Golden(Style):
    """Every colour, background included, mixed towards a warm gold: a colour grade, the most
    common kind of style LoRA. Like pastel it moves every colour towards one colour, which is
    what the toy base can show in generations (see docs/toy-world.md: its patterns and tints are
    learned by the loss but not drawn); unlike pastel it moves them towards a hue, not white.
    (Blended with pastel at 0.7 each, both show: measured in docs/toy-world.md.)"""

    name = "golden"
    trigger = "zkgolden"
    description = "a warm golden palette"

    def colour(self, name: str) -> tuple[int, int, int]:
        return tuple(round(c + (g - c) * GOLDEN_MIX) for c, g in zip(COLOURS[name], GOLD))


STYLES: dict[str, Style] = {
    style.name: style
    for style in (Style(), Stripes(), Pastel(), Outline(), Pixel(), Sepia(), Golden())
}
TOY_STYLES = tuple(name for name in STYLES if name != "plain")
