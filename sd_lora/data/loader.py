"""The training data steps: which samples train, the dataset (buckets, caches) and its loader.

Each takes only the config parts it needs; `train.train` calls them in order.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from sd_lora.config import DataConfig, TrainConfig
from sd_lora.data import DatasetScan, ImageCaptionDataset, Sample, load_image
from sd_lora.data.buckets import BucketBatchSampler, BucketSpec, bucket_info
from sd_lora.data.latent_cache import FILL_BATCH, CachedLatentDataset, LatentCache, vae_identity
from sd_lora.data.order import EpochSampler
from sd_lora.data.scan import regularization_layout
from sd_lora.errors import UserError
from sd_lora.models.vae import encode_posterior
from sd_lora.util.phases import phase
from sd_lora.util.processes import say
from sd_lora.util.words import plural


def style_samples(cfg: DataConfig, scan: DatasetScan) -> list[Sample]:
    """The dataset's samples, with the caption dropout asked for (data.caption_dropout)."""
    # A subset's own rate (an sd-scripts dataset config's caption_dropout_rate) wins.
    return [replace(s, caption_dropout=s.caption_dropout or cfg.caption_dropout) for s in scan.samples]


def regularization_samples(cfg: DataConfig, scan: DatasetScan,
                           reg: DatasetScan | None) -> list[Sample]:
    """The regularization images, repeated (or cut) to about as many items per epoch as the
    style's (see data.scan.regularization_layout)."""
    if reg is None:
        return []
    repeats, count = regularization_layout(scan.num_train_items, reg.num_images)
    return [replace(s, repeats=repeats, subset="regularization",
                    loss_weight=cfg.regularization_weight,
                    caption_dropout=cfg.regularization_caption_dropout,
                    preserve=cfg.regularization_target == "base") for s in reg.samples[:count]]


def bucket_spec(data: DataConfig, resolution: int) -> BucketSpec | None:
    """The bucketing of data.enable_bucket at this resolution; None without bucketing."""
    if not data.enable_bucket:
        return None
    try:
        return BucketSpec(resolution, data.bucket_reso_steps,
                          data.min_bucket_reso or resolution // 2,
                          data.max_bucket_reso or resolution * 2, data.bucket_no_upscale)
    except ValueError as e:
        raise UserError(f"data.enable_bucket at {resolution} px: {e}; set data.bucket_reso_steps, "
                        "data.min_bucket_reso and data.max_bucket_reso to fit") from None


def make_dataloader(samples: list[Sample], resolution: int, data: DataConfig, cfg: TrainConfig):
    dataset = make_dataset(samples, resolution, data, cfg)
    return dataset, make_loader(dataset, data, cfg)


def make_dataset(samples: list[Sample], resolution: int, data: DataConfig,
                 cfg: TrainConfig) -> ImageCaptionDataset:
    return ImageCaptionDataset(
        samples, resolution, center_crop=data.center_crop,
        random_flip=data.random_flip, seed=cfg.seed,
        shuffle_tags=data.shuffle_tags, keep_tokens=data.keep_tokens,
        buckets=bucket_spec(data, resolution),
        masks=(data.mask_path or "alpha") if data.masked_loss else None,
    )


AUTO_MEMORY_CACHE_GIB = 1.0  # data.cache_latents = "auto": in memory up to this, else on disk


def latent_cache_mode(data: DataConfig, dataset: ImageCaptionDataset, resolution: int,
                      latent_channels: int, factor: int) -> str:
    """"none", "memory" or "disk": data.cache_latents, with "auto" decided for this dataset
    (cached unless random crops need fresh pixels; in memory while the posteriors of every
    variant fit in AUTO_MEMORY_CACHE_GIB)."""
    if data.cache_latents != "auto":
        return data.cache_latents
    if not data.center_crop:
        return "none"
    variants = len(dataset) * (2 if data.random_flip else 1)
    side = resolution // factor
    size = variants * 2 * 4 * latent_channels * side * side  # mean and std, fp32
    return "memory" if size <= AUTO_MEMORY_CACHE_GIB * 2**30 else "disk"


def cache_latents(dataset: ImageCaptionDataset, vae, data: DataConfig, output_dir: Path,
                  show_progress: bool, mode: str) -> CachedLatentDataset:
    """Every image variant encoded once (or read from the disk cache); `mode` "memory" or
    "disk" (`latent_cache_mode`)."""
    folder = None
    if mode == "disk":
        folder = Path(data.cache_dir) if data.cache_dir else output_dir / "latent-cache"
    cached = CachedLatentDataset(dataset, LatentCache(folder), vae_identity(vae))

    def encode(pixels: torch.Tensor):
        return encode_posterior(vae, pixels)

    auto = ", data.cache_latents = 'auto'" if data.cache_latents == "auto" else ""
    where = f"{mode}{f', {folder}' if folder else ''}{auto}"
    variants = plural(len(cached.variants()), "image variant")
    with phase("latent cache", f"{variants} to encode or read ({where})", bar=False):
        batch = FILL_BATCH.get(next(vae.parameters()).device.type, FILL_BATCH["cpu"])
        encoded = cached.fill(encode, batch, show_progress=show_progress)  # its own bar
        say(f"latent cache ({where}): {variants}, {encoded} encoded now")
    return cached


def make_loader(dataset, data: DataConfig, cfg: TrainConfig, processes: int = 1):
    """The data loader; with buckets its batches are laid out for `processes` processes."""
    # Its own generator: each new iterator draws a worker seed, which would otherwise shift
    # the global RNG (LoRA dropout) and make a resumed run diverge.
    generator = torch.Generator().manual_seed(cfg.seed)
    if data.enable_bucket:
        batches = BucketBatchSampler(dataset.sizes, cfg.batch_size, seed=cfg.seed,
                                     processes=processes)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, generator=generator,
                                           num_workers=cfg.dataloader_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=EpochSampler(len(dataset), seed=cfg.seed),
        num_workers=cfg.dataloader_workers, drop_last=len(dataset) >= cfg.batch_size,
        generator=generator,
    )


def dataset_buckets(dataset: ImageCaptionDataset, data: DataConfig) -> dict | None:
    """ss_bucket_info of the dataset's images (each once, not per repeat); None unbucketed."""
    if not data.enable_bucket:
        return None
    first = {}
    for item, size in zip(dataset.items, dataset.sizes):
        first.setdefault(item.image, (item.size, size))
    return bucket_info([s for s, _ in first.values()], [b for _, b in first.values()])


def centre_crop_batch(samples: list[Sample], resolution: int) -> tuple[torch.Tensor, list[str]]:
    """(pixels (n, 3, r, r) in [-1, 1], captions) of `samples`, each centre-cropped: the fixed
    images that evaluation, validation and the quality report measure on."""
    pixels = torch.stack([load_image(s.image, resolution, center_crop=True) for s in samples])
    return pixels, [s.caption for s in samples]


def eval_images(scan: DatasetScan, resolution: int, count: int = 4):
    """The first `count` images of the dataset at their centre crop, with their captions."""
    return centre_crop_batch(scan.samples[:count], resolution)


