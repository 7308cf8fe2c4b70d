"""Decode an image file into a training tensor: EXIF-rotate, convert to RGB, resize, crop.

Pure functions: the same file, resolution and random state always give the same tensor.
"""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
WHITE = (255, 255, 255)
# What a failing decode raises: PIL's UnidentifiedImageError and "image file is truncated" are
# OSErrors; broken headers raise SyntaxError or ValueError; huge images DecompressionBombError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
MAX_PIXELS = 89_478_485  # Pillow's own warning limit (about 9459 x 9459); SD trains at ~1 MP
# check_pixel_count refuses what Pillow would only warn about, so its warning says nothing more.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def probe_image(path: str | Path | io.BytesIO) -> tuple[int, int]:
    """Decode the whole file the way `load_image` does and return its (width, height) upright.

    Raises one of `DECODE_ERRORS` when the file is not a readable image, and
    DecompressionBombError, from the header alone, for one over MAX_PIXELS. JPEGs are decoded
    at 1/8 scale (every byte is still read), so probing a large dataset stays quick.
    """
    with _open(path) as im:
        width, height = im.size
        check_pixel_count(width, height)
        im.draft(None, (1, 1))  # JPEG only: DCT scaling; a no-op for other formats
        upright = ImageOps.exif_transpose(im)  # loads (decodes) the pixels
        to_rgb(upright)
        if upright.size != im.size:  # rotated by 90 degrees
            width, height = height, width
    return width, height


def check_pixel_count(width: int, height: int) -> None:
    """Refuse, before decoding, an image too large to be a training image: a decompression
    bomb (a few KB of PNG can claim gigapixels) would take all memory."""
    if width * height > MAX_PIXELS:
        raise Image.DecompressionBombError(
            f"{width}x{height} is {width * height / 1e6:.0f} megapixels, over the "
            f"{MAX_PIXELS / 1e6:.0f} MP limit; refused before decoding (a decompression bomb, "
            "or a picture to downscale before training)"
        )


def _open(path):
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:  # Pillow's own check, at twice its limit
        raise Image.DecompressionBombError(f"{e}; refused before decoding") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white, 16-bit is rescaled."""
    if "transparency" in im.info and im.mode in ("P", "L", "RGB"):
        im = im.convert("RGBA")  # a palette entry or a colour key marks transparent pixels
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_high_depth_to_uint8(im)).convert("RGB")
    if im.mode == "CMYK":
        return _cmyk_to_rgb(im)
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # 1, L, P, YCbCr, HSV, ...; raises ValueError for unknown modes


def _high_depth_to_uint8(im: Image.Image) -> np.ndarray:
    """16-bit and 32-bit grayscale -> 0..255 (16-bit by /257; float taken as 0..1 or 0..255)."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
    elif im.mode == "I" and a.size and a.max() <= 255:
        scale = 1.0  # 8-bit values stored in a 32-bit container
    else:
        scale = 255.0 / 65535.0
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK -> sRGB through the embedded ICC profile when there is one, else PIL's formula."""
    icc = im.info.get("icc_profile")
    if icc:
        from PIL import ImageCms  # needs Pillow's littlecms; imported only for such files

        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, source, srgb, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: the plain conversion below is still a fair rendering
    return im.convert("RGB")


EXIF_ORIENTATION = 0x0112
EXIF_QUARTER_TURNS = (5, 6, 7, 8)  # orientations that swap width and height


class CropGeometry(NamedTuple):
    """Where a training square came from, in SDXL's size conditioning terms (pixels): the
    upright image's size before resizing, and the crop's top-left corner after it."""

    original_height: int
    original_width: int
    crop_top: int
    crop_left: int


def load_image(
    path: str | Path,
    resolution: int,
    center_crop: bool = True,
    rng: random.Random | torch.Generator | None = None,
) -> torch.Tensor:
    """Read `path` as a (3, resolution, resolution) float32 tensor in [-1, 1].

    The image is turned upright from its EXIF orientation, converted to RGB, its shorter side
    resized to `resolution` (Lanczos), then cropped to a square: centred, or at a random offset
    drawn from `rng` (required when `center_crop` is False, so the result is reproducible).
    """
    return load_image_and_geometry(path, resolution, center_crop, rng)[0]


def load_image_and_geometry(
    path: str | Path,
    resolution: int | tuple[int, int],
    center_crop: bool = True,
    rng: random.Random | torch.Generator | None = None,
) -> tuple[torch.Tensor, CropGeometry]:
    """`load_image`, and the crop's geometry (what SDXL's `time_ids` condition on).
    `resolution` (width, height) gives a (3, height, width) tensor: the image is resized to
    cover that size, then cropped to it (an aspect-ratio bucket)."""
    width_out, height_out = (resolution, resolution) if isinstance(resolution, int) else resolution
    if min(width_out, height_out) < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
    if not center_crop and rng is None:
        raise ValueError(
            "a random crop (center_crop=False) needs rng: a random.Random or torch.Generator"
        )
    with _open(path) as im:
        check_pixel_count(*im.size)
        width, height = im.size  # read before JPEG draft decoding shrinks it
        if im.getexif().get(EXIF_ORIENTATION) in EXIF_QUARTER_TURNS:
            width, height = height, width
        im.draft(None, (width_out, height_out))  # JPEG: decode at the smallest scale >= that
        rgb = to_rgb(ImageOps.exif_transpose(im))
    cropped, top, left = _resize_and_crop(rgb, width_out, height_out, None if center_crop else rng)
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.uint8).copy())  # (H, W, 3)
    geometry = CropGeometry(height, width, top, left)
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0), geometry  # (3, H, W)


def _resize_and_crop(
    im: Image.Image, width_out: int, height_out: int, rng: random.Random | torch.Generator | None
) -> tuple[Image.Image, int, int]:
    """Scale the image to cover width_out x height_out, then crop the side that overhangs
    (centred when rng is None); returns the crop and its top and left offsets in the scaled
    image."""
    width, height = im.size
    scale, new_w, new_h = _cover(width, height, width_out, height_out)
    left = _offset(new_w - width_out, rng)
    top = _offset(new_h - height_out, rng)
    # Resample only the crop window: box is in source pixels, the output is the target size.
    right = min(width, (left + width_out) / scale)
    bottom = min(height, (top + height_out) / scale)
    box = (left / scale, top / scale, right, bottom)
    return im.resize((width_out, height_out), Image.Resampling.LANCZOS, box=box), top, left


def _cover(width: int, height: int, width_out: int, height_out: int) -> tuple[float, int, int]:
    """(scale, scaled width, scaled height) of an image resized to cover the target."""
    scale = max(width_out / width, height_out / height)
    return scale, max(width_out, round(width * scale)), max(height_out, round(height * scale))


def centre_crop_geometry(size: tuple[int, int], target: tuple[int, int]) -> CropGeometry:
    """The geometry `load_image_and_geometry` gives a centre crop of an upright image of
    `size` (width, height) to `target` (width, height), without decoding it."""
    width, height = size
    _, new_w, new_h = _cover(width, height, *target)
    return CropGeometry(height, width, (new_h - target[1]) // 2, (new_w - target[0]) // 2)


def _offset(slack: int, rng: random.Random | torch.Generator | None) -> int:
    if slack <= 0:
        return 0
    if rng is None:
        return slack // 2
    if isinstance(rng, torch.Generator):
        return int(torch.randint(0, slack + 1, (1,), generator=rng).item())
    return rng.randint(0, slack)


def load_mask(path: str | Path, size: tuple[int, int], geometry: CropGeometry,
              from_alpha: bool) -> torch.Tensor:
    """(1, H, W) float32 in [0, 1]: the training mask of an image cropped as `geometry` says to
    `size` (width, height): the image's own alpha channel (`from_alpha`; none: all ones) or a
    separate mask image's brightness (white trains, black is ignored)."""
    width_out, height_out = size
    with _open(path) as im:
        upright = ImageOps.exif_transpose(im)
        if from_alpha:
            has_alpha = upright.mode in ("RGBA", "LA", "PA") or (
                upright.mode == "P" and "transparency" in upright.info)
            if not has_alpha:
                return torch.ones(1, height_out, width_out)
            gray = upright.convert("RGBA").getchannel("A")
        else:
            gray = upright.convert("L")
    if gray.size != (geometry.original_width, geometry.original_height):
        gray = gray.resize((geometry.original_width, geometry.original_height), Image.Resampling.BILINEAR)
    scale, _, _ = _cover(geometry.original_width, geometry.original_height, width_out, height_out)
    left, top = geometry.crop_left, geometry.crop_top
    box = (left / scale, top / scale, min(gray.width, (left + width_out) / scale),
           min(gray.height, (top + height_out) / scale))
    cropped = gray.resize((width_out, height_out), Image.Resampling.BILINEAR, box=box)
    return torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)[None]
