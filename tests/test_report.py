"""The quality report's parts: trigger words, weights on the trained layers, and the report an
ordinary (non-toy) run writes."""

from __future__ import annotations

import json

import pytest
import torch

from sd_lora.data.captions import detect_trigger, strip_trigger
from sd_lora.lora.inject import add_lora, lora_weight
from tests.lora_helpers import fill_lora_B


def test_trigger_is_the_first_tag_most_captions_share():
    captions = ["zkpastel, a red circle", "zkpastel, two blue squares", "zkpastel,a cat", "a dog"]
    assert detect_trigger(captions) is None  # 3 of 4 is under the 80% bar
    assert detect_trigger(captions[:3]) == "zkpastel"
    assert detect_trigger(["a red circle on blue", "two cats"]) is None
    assert detect_trigger([]) is None


def test_strip_trigger_removes_only_a_leading_trigger_tag():
    assert strip_trigger("zkpastel, a red circle, blue", "zkpastel") == "a red circle, blue"
    assert strip_trigger("a red circle, zkpastel", "zkpastel") == "a red circle, zkpastel"
    assert strip_trigger("zkpastelish, a cat", "zkpastel") == "zkpastelish, a cat"
    assert strip_trigger("zkpastel", "zkpastel") == "zkpastel"  # nothing would be left
    assert strip_trigger("zkpastel, a cat", None) == "zkpastel, a cat"


def test_lora_weight_scales_the_trained_layers_and_restores_them(tiny_pipe):
    unet = tiny_pipe.unet
    torch.manual_seed(0)  # lora_A's initialisation
    add_lora(unet, "unet", ("attn",), 4, 8.0, 0.0)
    fill_lora_B([unet], seed=3)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))

    def out():
        with torch.no_grad():
            return unet(x, torch.tensor([500]), context).sample

    full = out()
    with lora_weight([unet], 0.0):
        base = out()
    with lora_weight([unet], 0.5):
        half = out()
    effect, half_effect = (full - base).abs().mean(), (half - base).abs().mean()
    assert effect > 1e-3
    assert 0.3 * effect < half_effect < 0.7 * effect  # about half: linear within each layer
    assert torch.equal(out(), full)  # restored exactly
    with pytest.raises(RuntimeError), lora_weight([unet], 0.0):
        raise RuntimeError("a failure inside restores the weights too")
    assert torch.equal(out(), full)


@pytest.mark.slow
def test_every_run_writes_a_report_even_without_held_out_sets(tmp_path, monkeypatch):
    from sd_lora.config import load_config
    from sd_lora.train import report as report_module
    from sd_lora.train.recipe import train
    from tests.test_train import SAMPLE_DATA

    # The tiny base's images are noise and its report renders nothing (tests/test_run_console.py);
    # the renders (off-style stand-ins, grid, figure) are forced here to test them cheaply.
    monkeypatch.setattr(report_module, "renders_skipped", lambda base: None)

    result = train(load_config(None, [
        'model.base="tiny"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{tmp_path}"',
        "train.max_steps=4", "train.checkpoint_every=0", "sample.every=0", "sample.steps=3",
        "train.learning_rate=3e-3", "train.min_snr_gamma=5",
    ]), show_progress=False)
    from safetensors import safe_open

    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.trigger_phrase"] == "zkstripes"  # what A1111 and Civitai show
    assert metadata["ss_min_snr_gamma"] == "5.0" and "ss_prior_loss_weight" not in metadata
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["trigger_word"] == "zkstripes"
    assert "TRAINING images" in report["heldout_style_loss"]["source"]  # says it is not held out
    assert "renders of the base" in report["off_style_loss"]["source"]
    assert report["heldout_style_loss"]["base"] != report["heldout_style_loss"]["adapter"]
    assert report["style_score"] is None  # the tiny base is not the toy world
    assert report["grid"]["prompts"][-1] == report["grid"]["prompts"][0].removeprefix("zkstripes, ")
    assert (tmp_path / "report.png").stat().st_size > 10_000
