"""The built-in toy base, and what a style adapter trained on it by the demo's recipe shows.

Everything here runs on the shipped `toy` base with fixed seeds and the recipe of
examples/demo.toml (the app's "quick" preset plus the toy world's regularization images). The
margins are stated next to each assertion, with the figures measured on a 2-core CPU; the
README has the same figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd_lora.config import load_config
from sd_lora.jobs import PRESETS
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


def train_demo_recipe(style: str, out: Path, *extra: str):
    """examples/demo.toml on a toy style (the report finds datasets/toy/heldout/ beside it)."""
    overrides = [f'data.path="{TOY / style}"', f'data.regularization="{TOY / "plain"}"',
                 f'train.output_dir="{out / style}"', f"train.name={style}",
                 "train.checkpoint_every=0", "sample.every=0", *extra]
    if style != "pastel":  # the demo's sample prompts are pastel ones
        overrides += ["sample.prompts=[]", "sample.seeds=[]"]
    return train(load_config(REPO / "examples" / "demo.toml", overrides), show_progress=False)


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


GOLDEN_RECIPE = ("train.learning_rate=1e-3", "data.regularization_weight=20.0")


@pytest.fixture(scope="module")
def pastel_run(tmp_path_factory):
    """The demo's recipe on pastel (about 4 minutes on 2 cores), shared by the tests below."""
    return train_demo_recipe("pastel", tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    """Golden, at a larger step size and with the plain images weighted more."""
    return train_demo_recipe("golden", tmp_path_factory.mktemp("runs"), *GOLDEN_RECIPE)


@pytest.mark.slow
def test_the_demo_recipe_learns_pastel_and_its_trigger_word(pastel_run):
    result = pastel_run
    report = result.report
    heldout, off, score = (report["heldout_style_loss"], report["off_style_loss"],
                           report["style_score"])
    assert report["trigger_word"] == "zkpastel" and score["style"] == "pastel"
    assert heldout["images"] == 16 and "heldout/pastel" in heldout["source"]
    assert off["images"] == 16 and "heldout/plain" in off["source"]
    # Measured: -68.8%. The issue asks for at least -30%.
    assert heldout["change"] <= -0.5, heldout
    # Measured: pastel score of generations with "zkpastel" 0.23 -> 0.57, without 0.34 -> 0.35:
    # the style comes with the trigger word and only with it.
    assert score["with_trigger"]["rise"] >= 0.25, score
    assert abs(score["without_trigger"]["rise"]) <= 0.05, score
    # Measured: +3.3% (regularization images trained toward the base's own prediction; toward
    # their noise it was +13%). The issue asks for under 5%.
    assert abs(off["change"]) < 0.05, off
    assert (result.output_dir / "report.png").stat().st_size > 10_000
    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:  # 32 pastel, 32 plain items
        assert (f.metadata()["ss_num_train_images"], f.metadata()["ss_num_reg_images"]) == ("32", "32")
    assert (result.output_dir / "report_grid.png").is_file()

    # The blend measure on one adapter: its blend column is the adapter alone, and the pastel
    # rise agrees in sign and size with the report's (other prompts and seeds: "zkpastel, ...").
    from sd_lora.adapter_io import load_adapter
    from sd_lora.world.blend import measure_blend

    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    captions = [p.read_text().strip() for p in sorted((TOY / "heldout" / "plain").glob("*.txt"))[:4]]
    blend = measure_blend(pipe, [("pastel", load_adapter(result.adapter_files["kohya"]), 1.0)],
                          captions)
    assert blend.prompts[0] == "zkpastel, " + captions[0]
    assert blend.alone["pastel"] == blend.blend and blend.rise("pastel") >= 0.2, blend


def test_golden_is_learned_and_comes_with_its_trigger_word(golden_run):
    """The toy world's second colour grade, trained by the demo's recipe at a larger step size
    and with the plain images weighted more (lr 1e-3, regularization weight 20)."""
    report = golden_run.report
    score = report["style_score"]
    assert score["style"] == "golden" and report["trigger_word"] == "zkgolden"
    # Measured: golden score with "zkgolden" 0.49 -> 0.63 (the base alone already draws warm
    # colours after the word "golden"); without it 0.03 -> 0.12: the adapter leaks some of its
    # grade into prompts without the trigger word (two of the report's eight plain prompts
    # come out visibly warmer). Held-out loss -44.5%; off-style +3.4%.
    assert score["with_trigger"]["rise"] >= 0.08, score
    assert abs(score["without_trigger"]["rise"]) <= 0.15, score
    assert report["heldout_style_loss"]["change"] <= -0.3, report["heldout_style_loss"]
    assert abs(report["off_style_loss"]["change"]) < 0.05, report["off_style_loss"]


@pytest.mark.slow
def test_a_blend_of_pastel_and_golden_shows_both(pastel_run, golden_run):
    """Both adapters merged at 0.7 each, on prompts that carry both trigger words: each
    style's score rises over the base's, and above what the other adapter alone gives it, so
    the blend shows two styles and not one style plus its side effects."""
    from sd_lora.adapter_io import load_adapter
    from sd_lora.world.blend import blend_grid, measure_blend

    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    captions = [p.read_text().strip() for p in sorted((TOY / "heldout" / "plain").glob("*.txt"))[:8]]
    adapters = [(style, load_adapter(run.adapter_files["kohya"]), 0.7)
                for style, run in (("pastel", pastel_run), ("golden", golden_run))]
    blend = measure_blend(pipe, adapters, captions)  # seeds 100-107
    assert blend.prompts[0] == "zkpastel, zkgolden, " + captions[0]
    # Measured: pastel 0.16 -> 0.34 (golden alone 0.15, pastel alone 0.24); golden 0.04 -> 0.32
    # (pastel alone 0.04, golden alone 0.09). At 1.0 + 1.0 golden does not show (README).
    for style, other in (("pastel", "golden"), ("golden", "pastel")):
        assert blend.rise(style) >= 0.1, blend.as_dict()
        assert blend.blend[style] >= blend.alone[other][style] + 0.08, blend.as_dict()
    assert list(blend.images) == ["base", "pastel 0.7", "golden 0.7", "pastel 0.7 + golden 0.7"]
    assert blend_grid(blend).width == 8 * 128  # one picture per prompt, enlarged to 128 px


def test_demo_config_is_the_default_preset():
    """`make demo` and the app's default preset train the same recipe (the demo adds the toy
    world's regularization images)."""
    demo = load_config(REPO / "examples" / "demo.toml")
    for dotted, value in PRESETS["quick"].items():
        section, name = dotted.split(".")
        assert getattr(getattr(demo, section), name) == value, dotted
    assert demo.model.base == "toy"
    assert (REPO / demo.data.path).parent.joinpath("heldout", Path(demo.data.path).name).is_dir()
