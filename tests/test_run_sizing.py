"""Steps sized to the run: the before-and-after evaluation, and the latent cache."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from sd_lora.config import load_config
from sd_lora.data.loader import latent_cache_mode
from sd_lora.train.recipe import eval_image_count, train
from tests.test_train import job

REPO = Path(__file__).resolve().parents[1]


def _train_cfg(*overrides: str):
    return load_config(None, list(overrides)).train


def test_the_evaluation_is_sized_to_the_run():
    demo = load_config(REPO / "examples" / "demo.toml").train
    assert eval_image_count(demo) == 4  # 300 steps of 4: 40 passes against 3600
    assert eval_image_count(_train_cfg("train.max_steps=8", "train.batch_size=1")) == 0
    assert eval_image_count(_train_cfg("train.max_steps=40", "train.batch_size=1")) == 1
    assert eval_image_count(_train_cfg("train.max_steps=8", "train.eval_images=3")) == 3
    assert eval_image_count(_train_cfg("train.max_steps=3000", "train.eval_images=0")) == 0


def test_a_run_too_short_for_its_evaluation_says_so_and_records_none(tmp_path, capsys):
    result = train(job(tmp_path, "train.max_steps=2", "train.batch_size=1"), show_progress=False)
    assert (result.eval_loss_before, result.eval_loss_after, result.eval_images) == (None, None, 0)
    out = capsys.readouterr().out
    assert ("evaluation: skipped (2 steps of 1 image: a before-and-after loss would cost more "
            "than a tenth of the run; set train.eval_images to measure it anyway)") in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval_loss_before"] is None and summary["eval_loss_change"] is None


class _Items(list):
    """A stand-in dataset: only its length matters here."""


def test_auto_caches_latents_unless_random_crops_need_fresh_pixels():
    data = load_config(None, []).data
    assert data.cache_latents == "auto"
    few = _Items(range(100))
    assert latent_cache_mode(data, few, 512, 4, 8) == "memory"  # 100 x 128 KiB
    assert latent_cache_mode(replace(data, center_crop=False), few, 512, 4, 8) == "none"
    many = _Items(range(5000))  # 5000 x 2 flips x 512 KiB at 1024 px: over 1 GiB
    assert latent_cache_mode(replace(data, random_flip=True), many, 1024, 4, 8) == "disk"
    for explicit in ("none", "memory", "disk"):
        assert latent_cache_mode(replace(data, cache_latents=explicit), few, 512, 4, 8) == explicit
