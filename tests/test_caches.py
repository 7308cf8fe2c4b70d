"""Latent and text-encoder caching: stable keys, invalidation by content, reuse from disk, and
cached runs that train as uncached ones do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd_lora.config import ConfigError, load_config
from sd_lora.data import ImageCaptionDataset, scan_dataset
from sd_lora.data.buckets import BucketSpec
from sd_lora.data.images import centre_crop_geometry, load_image_and_geometry
from sd_lora.data.latent_cache import CachedLatentDataset, LatentCache, item_key, vae_identity
from sd_lora.models.builtin.tiny import build_tiny_pipeline
from sd_lora.models.text import (
    EmbeddingCache,
    encode_all,
    text_encoders_of,
    tokenize_all,
    tokenizers_of,
)
from sd_lora.train.recipe import train

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"


def test_keys_cover_content_size_crop_flip_and_vae():
    base = item_key("abc", (64, 64), (0, 8), False, "vae1")
    assert base == item_key("abc", (64, 64), (0, 8), False, "vae1")  # stable
    others = [item_key("abd", (64, 64), (0, 8), False, "vae1"),
              item_key("abc", (64, 48), (0, 8), False, "vae1"),
              item_key("abc", (64, 64), (8, 0), False, "vae1"),
              item_key("abc", (64, 64), (0, 8), True, "vae1"),
              item_key("abc", (64, 64), (0, 8), False, "vae2")]
    assert len({base, *others}) == 6
    with pytest.raises(ValueError, match="digest"):
        item_key("", (64, 64), (0, 0), False, "vae1")
    a, b = build_tiny_pipeline(seed=0).vae, build_tiny_pipeline(seed=1).vae
    assert vae_identity(a) == vae_identity(build_tiny_pipeline(seed=0).vae) != vae_identity(b)


@pytest.mark.parametrize("size, target", [((96, 64), (64, 64)), ((64, 150), (64, 64)),
                                          ((300, 200), (80, 48)), ((64, 64), (64, 64))])
def test_centre_crop_geometry_without_decoding_matches_the_loader(tmp_path, size, target):
    path = tmp_path / "x.png"
    Image.new("RGB", size, (10, 20, 30)).save(path)
    _, geometry = load_image_and_geometry(path, target, center_crop=True)
    assert centre_crop_geometry(size, target) == geometry


def copy_data(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for src in sorted(SAMPLE_DATA.iterdir())[:16]:  # 8 images with captions
        (folder / src.name).write_bytes(src.read_bytes())
    return folder


def fill(folder: Path, cache_dir: Path, flip: bool = True) -> tuple[CachedLatentDataset, int]:
    vae = build_tiny_pipeline().vae
    dataset = ImageCaptionDataset(scan_dataset(folder).samples, 64, random_flip=flip)
    cached = CachedLatentDataset(dataset, LatentCache(cache_dir), vae_identity(vae))
    encode = lambda px: (lambda d: (d.mean, d.std))(vae.encode(px).latent_dist)  # noqa: E731
    with torch.no_grad():
        return cached, cached.fill(encode, show_progress=False)


def test_a_changed_image_is_encoded_again_and_the_rest_come_from_disk(tmp_path):
    folder, cache_dir = copy_data(tmp_path), tmp_path / "cache"
    cached, encoded = fill(folder, cache_dir)
    assert encoded == 16  # 8 images x (plain, flipped)
    assert len(list(cache_dir.glob("*.safetensors"))) == 16
    first = next(p for p in sorted(folder.glob("*.png")))
    old_key = cached.key(0, False)
    Image.open(first).transpose(Image.Transpose.ROTATE_180).save(first)  # same name, new content
    again, encoded = fill(folder, cache_dir)
    assert encoded == 2  # only the changed picture, plain and flipped
    assert again.key(0, False) != old_key
    assert not torch.equal(again.cache.entries[again.key(0, False)][0],
                           cached.cache.entries[old_key][0])
    item = again[0]
    assert "pixel_values" not in item and item["cache_key"] in again.cache.entries
    torch.testing.assert_close(item["time_ids"], ImageCaptionDataset(
        scan_dataset(folder).samples, 64, random_flip=True)[0]["time_ids"])


def test_a_damaged_disk_entry_is_encoded_again(tmp_path):
    folder, cache_dir = copy_data(tmp_path), tmp_path / "cache"
    fill(folder, cache_dir, flip=False)
    victim = sorted(cache_dir.glob("*.safetensors"))[0]
    victim.write_bytes(b"not a tensor file")
    _, encoded = fill(folder, cache_dir, flip=False)
    assert encoded == 1


def job(tmp_path, name, *extra):
    return load_config(None, [
        'model.base="tiny"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{tmp_path / name}"',
        "train.name=c", "train.max_steps=6", "train.batch_size=2", "train.checkpoint_every=0",
        "sample.every=0", "sample.steps=2", "report.enabled=false", 'export.dtype="fp32"',
        "data.random_flip=true", "train.learning_rate=1e-2", *extra,
    ])


def adapter(result):
    return load_file(result.adapter_files["kohya"])


def max_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_cached_runs_train_as_uncached_ones_and_a_disk_cache_is_reused(tmp_path, capsys, monkeypatch):
    # One image per VAE call in both (the VAE's kernels then see the same batch shapes): the
    # cached run must be the same computation, bit for bit.
    from sd_lora.data import latent_cache

    monkeypatch.setattr(latent_cache, "FILL_BATCH", 1)
    one = ("train.batch_size=1",)
    plain = adapter(train(job(tmp_path, "plain", *one), show_progress=False))
    memory = adapter(train(job(tmp_path, "memory", *one, 'data.cache_latents="memory"'),
                           show_progress=False))
    assert max_difference(plain, memory) == 0.0
    shared = f'data.cache_dir="{tmp_path / "shared"}"'
    train(job(tmp_path, "disk1", *one, 'data.cache_latents="disk"', shared), show_progress=False)
    capsys.readouterr()
    disk = adapter(train(job(tmp_path, "disk2", *one, 'data.cache_latents="disk"', shared),
                         show_progress=False))
    printed = capsys.readouterr().out
    assert re.search(r"32 image variants, 0 encoded now", printed), printed
    assert max_difference(memory, disk) == 0.0


@pytest.mark.slow
def test_text_encoder_outputs_cached_train_as_encoded_each_step(tmp_path):
    frozen = ("lora.train_text_encoder=false", "data.shuffle_tags=true", "data.caption_dropout=0.3")
    plain = adapter(train(job(tmp_path, "plain", *frozen), show_progress=False))
    cached = adapter(train(job(tmp_path, "cached", *frozen, "data.cache_text_encoder_outputs=true"),
                           show_progress=False))
    assert max_difference(plain, cached) < 1e-5


def test_embedding_cache_encodes_each_caption_once_and_evicts_the_oldest():
    pipe = build_tiny_pipeline()
    cache = EmbeddingCache()
    captions = ["a red circle", "", "a red circle", "two blue squares"]
    got = cache.conditioning(tokenizers_of(pipe), text_encoders_of(pipe), captions, None, "cpu")
    want = encode_all(text_encoders_of(pipe), tokenize_all(tokenizers_of(pipe), captions))
    torch.testing.assert_close(got.hidden_states, want.hidden_states, atol=1e-6, rtol=0)
    assert (cache.misses, cache.hits) == (3, 1)
    one = got.hidden_states[0].numel() * 4
    small = EmbeddingCache(max_bytes=2 * one)
    small.conditioning(tokenizers_of(pipe), text_encoders_of(pipe), captions, None, "cpu")
    assert list(small.entries) == ["", "two blue squares"]  # the oldest went first


def test_caching_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="cache_latents.*center_crop"):
        load_config(None, ['data.cache_latents="memory"', "data.center_crop=false"])
    with pytest.raises(ConfigError, match="cache_text_encoder_outputs.*train_text_encoder = false"):
        load_config(None, ["data.cache_text_encoder_outputs=true"])


def test_bucketed_items_are_cached_at_their_bucket_size(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, size in enumerate([(96, 64), (64, 96), (64, 64)]):
        Image.new("RGB", size, (60 * i, 90, 120)).save(folder / f"{i}.png")
    vae = build_tiny_pipeline().vae
    dataset = ImageCaptionDataset(scan_dataset(folder).samples, 64,
                                  buckets=BucketSpec(64, 8, 32, 128))
    cached = CachedLatentDataset(dataset, LatentCache(), vae_identity(vae))
    with torch.no_grad():
        cached.fill(lambda px: (lambda d: (d.mean, d.std))(vae.encode(px).latent_dist),
                    show_progress=False)
    for i, (w, h) in enumerate(dataset.sizes):
        mean, _ = cached.cache.entries[cached[i]["cache_key"]]
        assert tuple(mean.shape) == (4, h // 8, w // 8)
