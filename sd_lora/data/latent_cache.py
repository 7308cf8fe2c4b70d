"""Latents computed once: the VAE posterior of each training image, in memory or on disk.

An entry holds the posterior's mean and standard deviation (fp32), not one sampled latent: the
trainer still draws `mean + std * noise` every step from its own generator, so a cached run
trains exactly as an uncached one does.

Entries are keyed by a stable sample id: the sha256 of the image file's bytes (from the scan),
the target size (square or bucket), the crop's position, the flip, and the VAE's identity (a
hash of its config and weights). A changed file has another digest, so it is encoded afresh;
a cache can never hand an image's latent to another image or caption, nor one VAE's latents
to another VAE. Random crops change per epoch and are not cached (the config refuses them).

On disk each entry is one small safetensors file `<key>.safetensors`, written atomically, so
several runs (and an interrupted one) share a folder safely.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sd_lora.util.atomic import atomic_path

KEY_VERSION = 1  # bump when what a key covers changes
# Images per VAE call while filling the cache. On a CPU one at a time is fastest: the full
# SD 1.5 VAE at 256 px took 0.81 s an image at batch 1 and 0.96 at batch 8 (bf16, 2 cores;
# the bigger activations fall out of cache). A GPU wants the batch.
FILL_BATCH = {"cpu": 1, "cuda": 8}


def vae_identity(vae: torch.nn.Module) -> str:
    """sha256 of the VAE's config and weights (the SD VAE: ~0.3 s once per run)."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def item_key(digest: str, size: tuple[int, int], crop: tuple[int, int], flip: bool,
             vae_id: str) -> str:
    """The stable id of one training tensor: file content, target (width, height), crop
    (top, left), flip and VAE."""
    if not digest:
        raise ValueError("a cache key needs the image's content digest (from the scan)")
    text = json.dumps([KEY_VERSION, digest, list(size), list(crop), bool(flip), vae_id])
    return hashlib.sha256(text.encode()).hexdigest()


class LatentCache:
    """{key: (mean, std)} in memory, mirrored to `folder` when given."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder else None
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.entries.get(key)
        if entry is None and self.folder is not None and self._path(key).is_file():
            try:
                tensors = load_file(self._path(key))
                entry = (tensors["mean"], tensors["std"])
            except Exception:  # a damaged entry (a disk error): encode it again
                entry = None
            if entry is not None:
                self.entries[key] = entry
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        mean, std = mean.detach().float().cpu().contiguous(), std.detach().float().cpu().contiguous()
        self.entries[key] = (mean, std)
        if self.folder is not None:
            with atomic_path(self._path(key)) as tmp:
                save_file({"mean": mean, "std": std}, str(tmp))

    def __contains__(self, key: str) -> bool:
        return key in self.entries or (self.folder is not None and self._path(key).is_file())


class CachedLatentDataset(torch.utils.data.Dataset):
    """An `ImageCaptionDataset` whose items carry their cached VAE posterior instead of pixels:
    {"latent_mean", "latent_std" (4, h, w), "cache_key", "caption", "index", "loss_weight",
    "preserve", "time_ids"}. Call `fill(encode)` once first."""

    def __init__(self, dataset, cache: LatentCache, vae_id: str) -> None:
        if not dataset.center_crop:
            raise ValueError("latent caching needs centre crops (a random crop changes every epoch)")
        self.dataset, self.cache, self.vae_id = dataset, cache, vae_id
        self.items, self.sizes = dataset.items, dataset.sizes
        self.unreadable: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _geometry(self, i: int):
        from sd_lora.data.images import centre_crop_geometry

        return centre_crop_geometry(self.items[i].size, self.sizes[i])

    def key(self, i: int, flip: bool) -> str:
        g = self._geometry(i)
        return item_key(self.items[i].digest, self.sizes[i], (g.crop_top, g.crop_left), flip,
                        self.vae_id)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self)):  # an unreadable image: the next item, as the dataset does
            i = (index + offset) % len(self)
            flip = self.dataset.flipped(i)
            key = self.key(i, flip)
            entry = self.cache.entries.get(key)
            if entry is not None:
                geometry = self._geometry(i)
                item = {"latent_mean": entry[0], "latent_std": entry[1], "cache_key": key,
                        **self.dataset.describe(i, self.dataset.time_ids(geometry, i))}
                mask = self.dataset.mask_for(i, geometry, flip)
                if mask is not None:
                    item["mask"] = mask
                return item
        raise RuntimeError(f"no latent of the {len(self)} items is cached; call fill() first")

    def variants(self) -> dict[str, tuple[int, bool]]:
        """Every distinct (image, size, flip) any epoch can ask for: {key: (item, flip)}."""
        flips = (False, True) if self.dataset.random_flip else (False,)
        return {self.key(i, flip): (i, flip) for i in range(len(self)) for flip in flips}

    def fill(self, encode, batch_size: int | None = None, show_progress: bool = True) -> int:
        """Encode every variant not cached yet (in memory, or read from disk); `encode`:
        (B, 3, H, W) pixels -> (mean, std) latents. Returns how many were encoded."""
        from tqdm import tqdm

        batch_size = batch_size or FILL_BATCH["cpu"]  # the caller passes its device's
        todo: dict[tuple[int, int], list[tuple[str, int, bool]]] = {}
        for key, (i, flip) in self.variants().items():
            if self.cache.get(key) is None:
                todo.setdefault(self.sizes[i], []).append((key, i, flip))
        count = sum(len(v) for v in todo.values())
        bar = tqdm(total=count, desc="caching latents", unit="img",
                   disable=not show_progress or count == 0)
        for group in todo.values():
            for start in range(0, len(group), batch_size):
                chunk = [(key, self.dataset.load(i, flip)) for key, i, flip in group[start:start + batch_size]]
                chunk = [(key, loaded[0]) for key, loaded in chunk if loaded is not None]
                if chunk:
                    mean, std = encode(torch.stack([pixels for _, pixels in chunk]))
                    for (key, _), m, s in zip(chunk, mean, std):
                        self.cache.put(key, m, s)
                bar.update(min(batch_size, len(group) - start))
        bar.close()
        return count
