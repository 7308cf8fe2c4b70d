"""Aspect-ratio bucketing: train each image near its own shape instead of a square crop.

The buckets are the (width, height) sizes, multiples of `step`, with each side in [min_side,
max_side] and an area of at most resolution^2 (sd-scripts' scheme): for each width the tallest
height that fits, and its transpose. Each image goes to the bucket whose aspect ratio is nearest
its own (measured as |log(w/h) - log(bw/bh)|, so 2:1 and 1:2 are equally far from square); with
`no_upscale`, an image smaller than the area keeps its own size, rounded down to `step`.

Every batch comes from one bucket (the tensors stack); the order is a fresh permutation per
epoch fixed by (seed, epoch) alone, like `order.EpochSampler`, so a resumed run sees the same
batches.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from sd_lora.util.words import plural

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class BucketSpec:
    resolution: int  # the side of the square whose area no bucket exceeds
    step: int = 64
    min_side: int = 256
    max_side: int = 1024
    no_upscale: bool = False

    def __post_init__(self) -> None:
        if self.step < 8 or self.step % 8:
            raise ValueError(f"bucket step {self.step} must be a positive multiple of 8 pixels")
        if not self.step <= self.min_side <= self.resolution <= self.max_side:
            raise ValueError(
                f"buckets need step <= min side <= resolution <= max side; got step {self.step}, "
                f"min {self.min_side}, resolution {self.resolution}, max {self.max_side}"
            )


def bucket_sizes(spec: BucketSpec) -> list[Size]:
    """Every bucket, sorted by aspect ratio (widest last)."""
    area = spec.resolution**2
    sizes: set[Size] = set()
    width = spec.min_side - spec.min_side % spec.step or spec.step
    while width <= spec.max_side:
        height = min(spec.max_side, area // width // spec.step * spec.step)
        if height >= spec.min_side:
            sizes.update({(width, height), (height, width)})
        width += spec.step
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def _log_ratio(size: Size) -> float:
    return math.log(size[0] / size[1])


def assign_bucket(image_size: Size, spec: BucketSpec, sizes: Sequence[Size] | None = None) -> Size:
    """The bucket an image of `image_size` (width, height) trains in."""
    width, height = image_size
    if spec.no_upscale and width * height <= spec.resolution**2:
        # Its own size, rounded down to the step (never upscaled); at least one step a side.
        return (max(spec.step, width // spec.step * spec.step),
                max(spec.step, height // spec.step * spec.step))
    sizes = sizes if sizes is not None else bucket_sizes(spec)
    target = _log_ratio(image_size)
    return min(sizes, key=lambda s: (abs(_log_ratio(s) - target), -s[0] * s[1]))


def plan_buckets(image_sizes: Sequence[Size], spec: BucketSpec) -> list[Size]:
    """The bucket of each image, in order."""
    sizes = bucket_sizes(spec)
    return [assign_bucket(s, spec, sizes) for s in image_sizes]


def bucket_info(image_sizes: Sequence[Size], buckets: Sequence[Size]) -> dict:
    """sd-scripts' `ss_bucket_info`: each bucket's resolution and image count, and the mean
    aspect-ratio error |image ratio - bucket ratio|."""
    counts = Counter(buckets)
    ordered = sorted(counts, key=lambda s: (s[0] / s[1], s[0]))
    errors = [abs(w / h - bw / bh) for (w, h), (bw, bh) in zip(image_sizes, buckets)]
    return {
        "buckets": {str(i): {"resolution": list(size), "count": counts[size]}
                    for i, size in enumerate(ordered)},
        "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0,
    }


def describe(info: dict) -> str:
    """One line per bucket, for the plan printed before training."""
    lines = [f"  {plural(len(info['buckets']), 'bucket')} (mean aspect-ratio error "
             f"{info['mean_img_ar_error']:.3f}):"]
    for entry in info["buckets"].values():
        w, h = entry["resolution"]
        lines.append(f"    {w}x{h}: {plural(entry['count'], 'image')}")
    return "\n".join(lines)


def bucket_info_json(info: dict) -> str:
    return json.dumps(info)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each from one bucket. Per epoch: each bucket's items in a
    fresh order, cut into global batches of batch_size x processes (a bucket's last one may be
    smaller: every image trains every epoch, as in sd-scripts), shuffled together, and each
    global batch split into `processes` consecutive per-process batches. Accelerate hands
    process i every processes-th batch, so each global batch is one bucket on all processes,
    and N processes see the batches one process of N x batch_size would. A bucket's last
    images that cannot give every process one are left for that epoch (with several
    processes only; the order, hence which they are, changes every epoch)."""

    def __init__(self, item_buckets: Sequence[Size], batch_size: int, seed: int,
                 processes: int = 1) -> None:
        self.item_buckets = list(item_buckets)
        self.batch_size, self.seed, self.processes = batch_size, seed, processes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        groups: dict[Size, list[int]] = {}
        for index, size in enumerate(self.item_buckets):
            groups.setdefault(size, []).append(index)
        size = self.batch_size * self.processes
        batches = []
        for bucket in sorted(groups):
            items = groups[bucket]
            order = [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
            batches += [order[i:i + size] for i in range(0, len(order), size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return [part for batch in batches for part in self._split(batch)]

    def _split(self, batch: list[int]) -> list[list[int]]:
        """One global batch as `processes` per-process batches (empty when it is too small)."""
        if self.processes == 1:
            return [batch]
        if len(batch) < self.processes:
            return []
        share = -(-len(batch) // self.processes)  # ceil: the first processes take the extra
        parts = [batch[i * share:(i + 1) * share] for i in range(self.processes)]
        return parts if all(parts) else []

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
