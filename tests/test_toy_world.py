"""The built-in toy base and what a style adapter trained on it must show (issue: the toy world).

Everything here runs on the shipped `toy` base with the app's default preset ("quick", the same
settings as examples/demo.toml) and fixed seeds; the margins are stated next to each assertion
and the measured figures are in the README.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_lora.adapter_io import load_adapter, pipeline_module_paths
from sd_lora.apply import adapters_applied
from sd_lora.config import load_config
from sd_lora.jobs import PRESETS, preset_toml
from sd_lora.models import load_pipeline, model_family
from sd_lora.sampling import RenderSettings, render
from sd_lora.train import train
from sd_lora.world.scenes import caption, scene_at
from sd_lora.world.scorer import prompt_following_accuracy, style_score
from sd_lora.world.styles import STYLES
from sd_lora.world.toy_base import toy_base_path

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "datasets" / "toy"
BLEND = ("pastel", "outline")  # two styles that combine: pale colours, shapes drawn as outlines


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    torch.set_num_threads(2)  # the toy UNet is large enough for a second thread to pay


def train_style(style: str, out: Path):
    """The default preset on a toy style dataset (the report finds datasets/toy/heldout/)."""
    text = preset_toml("quick", "toy", TOY / style, style)
    config = load_config(None, [*_preset_overrides(text), f'train.output_dir="{out / style}"'])
    return train(config, show_progress=False)


def _preset_overrides(text: str) -> list[str]:
    """A preset's TOML as dotted overrides (every field it sets)."""
    raw = tomllib.loads(text)
    return [f"{section}.{key}={json.dumps(value)}" for section, fields in raw.items()
            if isinstance(fields, dict) for key, value in fields.items()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-runs")
    return {style: train_style(style, out) for style in BLEND}


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
@pytest.mark.parametrize("style", BLEND)
def test_style_adapter_learns_the_style_without_leaking(runs, style):
    report = runs[style].report
    heldout, off = report["heldout_style_loss"], report["off_style_loss"]
    assert heldout["images"] == 16 and f"heldout/{style}" in heldout["source"]
    assert off["images"] == 16 and "heldout/plain" in off["source"]
    assert heldout["change"] <= -0.30, heldout  # held-out style loss at least 30% lower
    assert abs(off["change"]) < 0.05, off  # off-style loss changes by less than 5%
    score = report["style_score"]
    assert score["style"] == style
    assert score["with_trigger"]["rise"] >= 0.4, score  # generations with the trigger: in style
    assert (runs[style].output_dir / "report.png").stat().st_size > 10_000
    assert (runs[style].output_dir / "report_grid.png").is_file()


@pytest.mark.slow
def test_blending_two_style_adapters_shows_both(runs):
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    paths = pipeline_module_paths(pipe)
    adapters = [load_adapter(runs[s].adapter_files["kohya"], paths) for s in BLEND]
    triggers = ", ".join(STYLES[s].trigger for s in BLEND)
    prompts = [f"{triggers}, {caption(scene_at(i, 31), STYLES['plain'])}" for i in range(8)]

    def scores(blend) -> dict[str, float]:
        with adapters_applied(pipe, blend):
            images = [render(pipe, RenderSettings(prompt=p, seed=i, steps=20, guidance_scale=7.0,
                                                  width=64, height=64))
                      for i, p in enumerate(prompts)]
        return {s: float(np.mean([style_score(im, s) for im in images])) for s in BLEND}

    base = scores([])
    blended = scores([(a, 1.0, 1.0) for a in adapters])
    for style in BLEND:  # both styles show in the blend
        assert blended[style] - base[style] >= 0.3, (style, base, blended)


def test_demo_config_is_the_default_preset():
    """`make demo` and the app's default preset train the same recipe the tests check."""
    demo = load_config(REPO / "examples" / "demo.toml")
    for dotted, value in PRESETS["quick"].items():
        section, name = dotted.split(".")
        assert getattr(getattr(demo, section), name) == value, dotted
    assert demo.model.base == "toy"
    assert (REPO / demo.data.path).parent.joinpath("heldout", Path(demo.data.path).name).is_dir()
