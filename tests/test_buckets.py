"""Aspect-ratio bucketing: the bucket sizes, each image's bucket, one shape per batch, the
order fixed by (seed, epoch), and a bucketed training run with its ss_bucket_info."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sd_lora.config import load_config
from sd_lora.data import ImageCaptionDataset, scan_dataset
from sd_lora.data.buckets import (
    BucketBatchSampler,
    BucketSpec,
    assign_bucket,
    bucket_info,
    bucket_sizes,
    plan_buckets,
)
from sd_lora.train.recipe import train

SPEC = BucketSpec(resolution=512, step=64, min_side=256, max_side=1024)


def test_bucket_sizes_follow_the_step_area_and_side_limits():
    sizes = bucket_sizes(SPEC)
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= min(w, h) and max(w, h) <= 1024
        assert w * h <= 512 * 512
        assert (h, w) in sizes  # every bucket's transpose too
    # For each width the tallest height that fits the area (or the transpose of such a pair):
    # one step more on the free side would not fit.
    for w, h in sizes:
        assert 1024 in (w, h) or w * (h + 64) > 512 * 512 or (w + 64) * h > 512 * 512


@pytest.mark.parametrize("image, bucket", [
    ((1000, 1000), (512, 512)),
    ((1920, 1080), (640, 384)),   # 16:9 -> the bucket of nearest aspect (1.67 vs 1.78)
    ((1080, 1920), (384, 640)),
    ((3000, 1000), (832, 256)),   # 3:1 -> 3.25 (the next narrower bucket, 768x320, is 2.4)
    ((100, 4000), (256, 1024)),   # past the widest bucket: the widest
])
def test_each_image_goes_to_the_bucket_of_nearest_aspect(image, bucket):
    assert assign_bucket(image, SPEC) == bucket
    target = math.log(image[0] / image[1])
    best = min(abs(math.log(w / h) - target) for w, h in bucket_sizes(SPEC))
    assert abs(math.log(bucket[0] / bucket[1]) - target) == pytest.approx(best)


def test_no_upscale_keeps_small_images_at_their_own_size():
    spec = BucketSpec(512, 64, 256, 1024, no_upscale=True)
    assert assign_bucket((300, 200), spec) == (256, 192)  # rounded down, never upscaled
    assert assign_bucket((1920, 1080), spec) == (640, 384)  # larger than the area: as usual


def test_spec_errors_name_the_values():
    with pytest.raises(ValueError, match="multiple of 8"):
        BucketSpec(512, step=12)
    with pytest.raises(ValueError, match="min 600, resolution 512"):
        BucketSpec(512, 64, 600, 1024)


def make_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i % 255, 90, 160)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"zkshape, image {i}")
    return folder


SIZES = [(96, 64)] * 5 + [(64, 96)] * 4 + [(64, 64)] * 3 + [(128, 48)]


def test_batches_have_one_shape_and_every_image_each_epoch(tmp_path):
    scan = scan_dataset(make_images(tmp_path / "data", SIZES))
    spec = BucketSpec(64, step=8, min_side=32, max_side=128)
    dataset = ImageCaptionDataset(scan.samples, 64, buckets=spec, center_crop=False, seed=1)
    assert dataset.sizes == plan_buckets([s.size for s in dataset.items], spec)
    sampler = BucketBatchSampler(dataset.sizes, batch_size=2, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seen = []
        for batch in loader:
            shapes = {tuple(p.shape) for p in batch["pixel_values"]}
            assert len(shapes) == 1, shapes  # one bucket per batch
            h, w = batch["pixel_values"].shape[-2:]
            assert all(t[4:].tolist() == [h, w] for t in batch["time_ids"])  # target size
            seen += batch["index"].tolist()
        assert sorted(seen) == list(range(len(dataset)))
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[2] != orders[1]  # fixed by (seed, epoch): a resume sees the same
    assert orders[0] == list(BucketBatchSampler(dataset.sizes, 2, seed=3))


def test_bucket_info_counts_and_error():
    images = [(96, 64), (96, 64), (64, 64)]
    buckets = [(80, 56), (80, 56), (64, 64)]
    info = bucket_info(images, buckets)
    assert [e["resolution"] for e in info["buckets"].values()] == [[64, 64], [80, 56]]
    assert [e["count"] for e in info["buckets"].values()] == [1, 2]
    assert info["mean_img_ar_error"] == pytest.approx(2 * abs(1.5 - 80 / 56) / 3)


def test_a_bucketed_run_trains_and_records_its_buckets(tmp_path):
    data = make_images(tmp_path / "data", SIZES)
    config = load_config(None, [
        'model.base="tiny"', f'data.path="{data}"', f'train.output_dir="{tmp_path / "run"}"',
        "train.name=b", "train.max_steps=4", "train.batch_size=2", "train.checkpoint_every=0",
        "sample.steps=2", "sample.every=0", "report.enabled=false", "data.enable_bucket=true",
        "data.bucket_reso_steps=8", "data.random_flip=true", "data.center_crop=false",
    ])
    result = train(config, show_progress=False)
    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:
        metadata = f.metadata()
    info = json.loads(metadata["ss_bucket_info"])
    assert metadata["ss_enable_bucket"] == "True"
    assert (metadata["ss_min_bucket_reso"], metadata["ss_max_bucket_reso"]) == ("32", "128")
    assert sum(e["count"] for e in info["buckets"].values()) == len(SIZES)
    assert [64, 64] in [e["resolution"] for e in info["buckets"].values()]
    assert len(info["buckets"]) >= 3


def test_buckets_that_cannot_fit_the_resolution_are_a_clear_error(tmp_path):
    from sd_lora.errors import UserError

    data = make_images(tmp_path / "data", SIZES[:2])
    config = load_config(None, [
        'model.base="tiny"', f'data.path="{data}"', f'train.output_dir="{tmp_path / "run"}"',
        "data.enable_bucket=true", "data.min_bucket_reso=256",  # above the 64 px resolution
    ])
    with pytest.raises(UserError, match="data.enable_bucket at 64 px.*min 256"):
        train(config, show_progress=False)


def test_a_bucketed_run_resumed_mid_epoch_ends_at_the_same_adapter(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from tests.lora_helpers import killed_then_resumed

    data = make_images(tmp_path / "data", SIZES)

    def job(out):
        return load_config(None, [
            'model.base="tiny"', f'data.path="{data}"', f'train.output_dir="{out}"', "train.name=b",
            "train.max_steps=7", "train.batch_size=2", "train.checkpoint_every=0", "sample.every=0",
            "sample.steps=2", "report.enabled=false", "data.enable_bucket=true",
            "data.bucket_reso_steps=8", "data.random_flip=true", "data.center_crop=false",
            'export.dtype="fp32"', "train.learning_rate=1e-3",
        ])

    straight = train(job(tmp_path / "straight"), show_progress=False)
    resumed = killed_then_resumed(job(tmp_path / "resumed"), monkeypatch)  # at 3 of 8 batches
    a, b = load_file(straight.adapter_files["kohya"]), load_file(resumed.adapter_files["kohya"])
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
