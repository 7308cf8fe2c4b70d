"""Masked loss: the mask scales each element's loss, follows its image's crop and flip, comes
from the alpha channel or a mask folder, and a run trains with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sd_lora.config import ConfigError, load_config
from sd_lora.data import ImageCaptionDataset, scan_dataset
from sd_lora.models.builtin.tiny import sd1_scheduler_config
from sd_lora.objective import denoising_loss, training_schedule
from sd_lora.train.recipe import train
from tests.test_objective import _Oracle


def test_the_mask_scales_each_elements_loss_and_the_mean_counts_all():
    schedule = training_schedule(sd1_scheduler_config(), "epsilon")
    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    error = torch.full((1, 4, 8, 8), 2.0)  # squared error 4 everywhere
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32] = 1.0  # the left half of the image trains
    loss = denoising_loss(_Oracle(noise + error), schedule, latents, None, noise,
                          torch.tensor([10]), mask=mask)
    assert float(loss) == pytest.approx(4.0 * 0.5)
    unmasked = denoising_loss(_Oracle(noise + error), schedule, latents, None, noise, torch.tensor([10]))
    assert float(unmasked) == pytest.approx(4.0)


def rgba_images(folder: Path) -> Path:
    """Red opaque left halves, transparent right halves, in several shapes."""
    folder.mkdir(parents=True)
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 80)]):
        a = np.zeros((h, w, 4), dtype=np.uint8)
        a[..., 0], a[..., 3] = 220, 0
        a[:, : w // 2, 3] = 255
        Image.fromarray(a, "RGBA").save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red half")
    return folder


def test_alpha_masks_follow_their_images_crop_and_flip(tmp_path):
    folder = rgba_images(tmp_path / "data")
    samples = scan_dataset(folder).samples
    for seed in range(4):
        dataset = ImageCaptionDataset(samples, 48, center_crop=False, random_flip=True, seed=seed,
                                      masks="alpha")
        for i in range(len(dataset)):
            item = dataset[i]
            mask, pixels = item["mask"][0], item["pixel_values"]
            red = (pixels[0] > 0.5) & (pixels[1] < 0.0)  # opaque red; transparent is white
            white = (pixels > 0.9).all(dim=0)
            assert bool((mask[red] > 0.6).all()) and bool((mask[white] < 0.4).all())
            assert red.any() and white.any()


def test_a_mask_folder_is_used_and_a_missing_mask_trains_whole(tmp_path):
    folder = rgba_images(tmp_path / "data")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (96, 64), 0).save(masks / "0.png")  # image 0: ignored entirely
    dataset = ImageCaptionDataset(scan_dataset(folder).samples, 48, masks=str(masks))
    by_name = {dataset.items[i].image.name: dataset[i]["mask"] for i in range(len(dataset))}
    assert float(by_name["0.png"].max()) == 0.0
    assert float(by_name["1.png"].min()) == 1.0  # no mask file: all of it trains
    with pytest.raises(ConfigError, match="mask_path is set but data.masked_loss is false"):
        load_config(None, [f'data.mask_path="{masks}"'])


@pytest.mark.slow
def test_a_masked_run_trains_and_says_so(tmp_path):
    folder = rgba_images(tmp_path / "data")
    config = load_config(None, [
        'model.base="tiny"', f'data.path="{folder}"', f'train.output_dir="{tmp_path / "run"}"',
        "train.name=m", "train.max_steps=2", "train.batch_size=1", "train.checkpoint_every=0",
        "sample.every=0", "sample.steps=2", "report.enabled=false", "data.masked_loss=true",
        'data.cache_latents="memory"',
    ])
    result = train(config, show_progress=False)
    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:
        assert f.metadata()["ss_masked_loss"] == "True"
