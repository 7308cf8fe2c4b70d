"""The built-in toy base, and the quality report of a style adapter trained on it.

Everything here runs on the shipped `toy` base with fixed seeds. The report's figures for the
default preset (examples/demo.toml) are in the README; what this file asserts is that the base
draws what its prompts say and that a run on the toy world measures what the report promises
(held-out style images, off-style images, style scores), with a learning margin that was
measured (see each assertion).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_lora.config import load_config
from sd_lora.jobs import PRESETS, preset_toml
from sd_lora.models import load_pipeline, model_family
from sd_lora.sampling import RenderSettings, render
from sd_lora.train import train
from sd_lora.world.scorer import prompt_following_accuracy
from sd_lora.world.toy_base import toy_base_path

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "datasets" / "toy"


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    torch.set_num_threads(2)  # the toy UNet is large enough for a second thread to pay


def train_style(style: str, out: Path, overrides: list[str] = ()):
    """The default preset on a toy style dataset (the report finds datasets/toy/heldout/)."""
    text = preset_toml("quick", "toy", TOY / style, style)
    config = load_config(None, [*_preset_overrides(text), f'train.output_dir="{out / style}"',
                                *overrides])
    return train(config, show_progress=False)


def _preset_overrides(text: str) -> list[str]:
    """A preset's TOML as dotted overrides (every field it sets)."""
    raw = tomllib.loads(text)
    return [f"{section}.{key}={json.dumps(value)}" for section, fields in raw.items()
            if isinstance(fields, dict) for key, value in fields.items()]


def test_toy_base_is_a_diffusers_folder_diffusers_loads_itself():
    from diffusers import StableDiffusionPipeline

    folder = toy_base_path()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 40e6, f"the toy base is {size / 1e6:.1f} MB; it must stay small enough to ship"
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    ours = load_pipeline("toy")
    assert model_family(ours) == "sd1" and ours.unet.config.sample_size * ours.vae_scale_factor == 64
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["unet"]["seconds"] > 0 and "evaluation" in recipe


def test_render_sizes_latents_by_the_vaes_own_factor():
    """The toy VAE downsamples 4x, SD's 8x: a 64 px request must give 16x16 latents and a 64 px
    image (a hard-coded 8 once gave 8x8 latents: half-size blurry pictures, not an error)."""
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4
    image = render(pipe, RenderSettings(prompt="a red circle on a blue background", seed=0,
                                        steps=2, width=64, height=96))
    assert image.size == (64, 96)


@pytest.mark.slow
def test_toy_base_draws_what_the_prompt_says():
    """Colour and shape of the main object right in most generations (measured: see README)."""
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    accuracy = prompt_following_accuracy(pipe, count=30, seed=23)
    assert accuracy["background"] >= 0.8, accuracy
    assert accuracy["colour"] >= 0.7, accuracy
    assert accuracy["colour_and_shape"] >= 0.5, accuracy


@pytest.mark.slow
def test_a_run_on_the_toy_world_reports_held_out_off_style_and_style_scores(tmp_path):
    """60 steps of the default preset on the outline style (the demo trains 300)."""
    result = train_style("outline", tmp_path, ["train.max_steps=60", "train.checkpoint_every=0",
                                               "sample.every=0"])
    report = result.report
    heldout, off = report["heldout_style_loss"], report["off_style_loss"]
    assert report["trigger_word"] == "zkoutline"
    assert heldout["images"] == 16 and "heldout/outline" in heldout["source"]
    assert off["images"] == 16 and "heldout/plain" in off["source"]
    # Measured at 60 steps: -41% (off-style: +147%; the leakage is the open part of the issue).
    assert heldout["change"] <= -0.25, heldout
    assert off["base"] != off["adapter"]  # measured with the adapter on, not skipped
    score = report["style_score"]
    assert score["style"] == "outline" and score["prompts"] == 8
    for key in ("with_trigger", "without_trigger"):
        assert np.isfinite([score[key]["base"], score[key]["adapter"]]).all()
    assert (result.output_dir / "report.png").stat().st_size > 10_000
    assert (result.output_dir / "report_grid.png").is_file()


def test_demo_config_is_the_default_preset():
    """`make demo` and the app's default preset train the same recipe the tests check."""
    demo = load_config(REPO / "examples" / "demo.toml")
    for dotted, value in PRESETS["quick"].items():
        section, name = dotted.split(".")
        assert getattr(getattr(demo, section), name) == value, dotted
    assert demo.model.base == "toy"
    assert (REPO / demo.data.path).parent.joinpath("heldout", Path(demo.data.path).name).is_dir()
