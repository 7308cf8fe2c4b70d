"""The torch Dataset: scanned samples expanded by their repeats, loaded as training tensors.

Every random choice (flip, crop offset) is drawn from a generator seeded by (seed, epoch, index),
so item i of epoch e is the same tensor in an uninterrupted run and in a resumed one, whatever
the worker process or the order in which items are asked for.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from sd_lora.data.buckets import BucketSpec, plan_buckets
from sd_lora.data.images import DECODE_ERRORS, load_image_and_geometry, load_mask
from sd_lora.data.scan import Sample

logger = logging.getLogger(__name__)


class ImageCaptionDataset(Dataset):
    """Item i -> {"pixel_values": (3, H, W) float32 in [-1, 1], "caption": str, "index": int,
    "loss_weight": float, "preserve": bool, "time_ids": (6,) float32}.

    `time_ids` is SDXL's size conditioning for the item: (original height, original width, crop
    top, crop left, target height, target width); other bases ignore it. (H, W) is the square
    resolution, or with `buckets` the item's aspect-ratio bucket (see data.buckets; batch them
    with buckets.BucketBatchSampler over `sizes`).

    Call `set_epoch(epoch)` before each pass (Accelerate's data loader does when it wraps this).
    With DataLoader workers, use non-persistent workers so that each pass sees the new epoch.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        shuffle_tags: bool = False,
        keep_tokens: int = 0,
        buckets: BucketSpec | None = None,
        masks: str | None = None,  # "alpha", or a folder of same-name mask images
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        self.items = [s for s in samples for _ in range(s.repeats)]
        if not self.items:
            raise ValueError("ImageCaptionDataset needs at least one sample (with repeats >= 1)")
        self.resolution = resolution
        # Each item's (width, height): its aspect-ratio bucket, else the square resolution.
        self.sizes: list[tuple[int, int]] = [(resolution, resolution)] * len(self.items)
        if buckets is not None:
            unsized = [s.image for s in self.items if s.size is None]
            if unsized:
                raise ValueError(f"bucketing needs each image's size from the scan; {unsized[0]} has none")
            self.sizes = plan_buckets([s.size for s in self.items], buckets)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.shuffle_tags, self.keep_tokens = shuffle_tags, keep_tokens
        self.masks = masks
        self.epoch = 0
        self._reported: set[str] = set()  # paths already logged as unreadable (per process)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        """Load item `index`; if its file became unreadable since the scan, the next one that loads."""
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} items")
        for offset in range(len(self.items)):
            i = (index + offset) % len(self.items)
            loaded = self.load(i)
            if loaded is not None:
                pixels, time_ids, mask = loaded
                item = {"pixel_values": pixels, **self.describe(i, time_ids)}
                if mask is not None:
                    item["mask"] = mask
                return item
        raise RuntimeError(
            f"none of the {len(self.items)} dataset items can be read any more "
            f"(first: {self.items[0].image}); did the dataset folder change after the scan?"
        )

    def describe(self, i: int, time_ids: torch.Tensor) -> dict:
        """Item i's fields besides its pixels."""
        item = self.items[i]
        return {"caption": self._caption(i), "index": i, "loss_weight": item.loss_weight,
                "preserve": item.preserve, "time_ids": time_ids}

    def flipped(self, i: int) -> bool:
        """Whether item i is mirrored this epoch (the first draw of its random stream)."""
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        return self.random_flip and rng.random() < 0.5

    def time_ids(self, geometry, i: int) -> torch.Tensor:
        width, height = self.sizes[i]
        return torch.tensor([*geometry, height, width], dtype=torch.float32)

    def _caption(self, i: int) -> str:
        """The item's caption, or "" with its caption_dropout chance (its own random stream, so
        flips and crops draw the same numbers with or without dropout)."""
        item = self.items[i]
        if item.caption_dropout and (
            random.Random(f"{self.seed}:{self.epoch}:{i}:caption").random() < item.caption_dropout
        ):
            return ""
        if not self.shuffle_tags:
            return item.caption
        return shuffled_tags(item.caption, self.keep_tokens,
                             random.Random(f"{self.seed}:{self.epoch}:{i}:tags"))

    def load(self, i: int, flip: bool | None = None):
        """Item i's (pixels, time_ids, mask or None) this epoch (`flip` forces the mirroring);
        None when the file cannot be read any more."""
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")  # str seeds hash with SHA-512: stable
        drawn = self.random_flip and rng.random() < 0.5
        flip = drawn if flip is None else flip
        path = self.items[i].image
        try:
            pixels, geometry = load_image_and_geometry(path, self.sizes[i], self.center_crop, rng)
        except DECODE_ERRORS as e:
            if str(path) not in self._reported:
                self._reported.add(str(path))
                logger.warning(
                    "cannot load %s (%s: %s); using the next item instead",
                    path,
                    type(e).__name__,
                    e,
                )
            return None
        mask = self.mask_for(i, geometry, flip)
        return (pixels.flip(-1) if flip else pixels), self.time_ids(geometry, i), mask

    def mask_for(self, i: int, geometry, flip: bool) -> torch.Tensor | None:
        """Item i's loss mask (1, H, W), cropped and flipped as its pixels; None without masks."""
        if self.masks is None:
            return None
        path = self.items[i].image
        if self.masks != "alpha":
            found = [p for p in Path(self.masks).glob(path.stem + ".*") if p.is_file()]
            if not found:
                return torch.ones(1, self.sizes[i][1], self.sizes[i][0])  # no mask: all of it
            path = found[0]
        mask = load_mask(path, self.sizes[i], geometry, from_alpha=self.masks == "alpha")
        return mask.flip(-1) if flip else mask


def shuffled_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """sd-scripts' shuffle_caption: the comma-separated tags in a random order, the first
    `keep_tokens` tags (the trigger word, usually) left in place at the front."""
    tags = [t.strip() for t in caption.split(",")]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(t for t in kept + rest if t)
