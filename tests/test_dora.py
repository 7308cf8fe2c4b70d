"""DoRA that trains: the magnitudes reach the optimizer and move, LoCon + DoRA exports, and the
exported files reproduce the trained model where the loading tool can hold DoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd_lora.config import load_config
from sd_lora.lora.inject import base_weights, lora_named_parameters, lora_weight, read_adapter_state
from sd_lora.models.builtin.tiny import build_tiny_pipeline
from sd_lora.train.recipe import add_adapters, make_optimizer
from tests.lora_helpers import train_keeping_loop

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"


def dora_job(tmp_path, name, *extra):
    return load_config(None, [
        'model.base="tiny"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{tmp_path}"',
        f"train.name={name}", "train.max_steps=4", "train.batch_size=2",
        "train.checkpoint_every=0", "sample.enabled=false", "report.enabled=false",
        'export.dtype="fp32"', "lora.use_dora=true", "train.learning_rate=2e-2",
        "train.text_encoder_learning_rate=2e-2", *extra,
    ])


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().reshape(weight.shape[0], -1).norm(dim=1)


def test_the_magnitudes_are_trainable_and_in_the_optimizer():
    config = load_config(None, ["lora.use_dora=true", 'lora.unet_targets=["attn", "conv"]'])
    trained = add_adapters(build_tiny_pipeline(), config.lora)
    optimizer = make_optimizer(trained, config.train)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    magnitudes = [(n, p) for m in trained.values() for n, p in lora_named_parameters(m)
                  if "lora_magnitude_vector" in n]
    assert magnitudes, "no DoRA magnitude is trainable"
    assert any(".conv1." in n for n, _ in magnitudes)  # the conv layers' too
    for name, param in magnitudes:
        assert param.requires_grad and param.dtype == torch.float32, name
        assert id(param) in in_optimizer, name


@pytest.mark.slow
def test_a_dora_run_moves_the_magnitudes_and_its_files_reproduce_the_trained_model(tmp_path):
    """After 4 steps the exported magnitudes are no longer the base's row norms; the kohya file
    read by sd-lora and the diffusers file loaded by diffusers both give the trained UNet's and
    text encoder's outputs to 1e-5."""
    from sd_lora.adapters.apply import apply_adapters
    from sd_lora.adapters.files import load_adapter, pipeline_module_paths

    result, loop = train_keeping_loop(dora_job(tmp_path, "d", 'export.formats=["kohya", "diffusers"]'))
    base = build_tiny_pipeline()
    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:
        key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        scale = f.get_tensor(f"{key}.dora_scale")
        assert scale.shape == (32, 1)  # (out, 1): per output row
        assert '"dora_wd": "True"' in f.metadata()["ss_network_args"]
    w0 = base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    moved = float((scale.flatten() - row_norms(w0)).abs().max())
    assert moved > 1e-3, f"the magnitudes did not train (max change {moved})"

    def outputs(pipe):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 49406, (1, 77), generator=g)
        latents = torch.randn(1, 4, 8, 8, generator=g)
        with torch.no_grad():
            text = pipe.text_encoder(ids)[0]
            fixed_text = torch.randn(1, 77, text.shape[-1], generator=g)
            return text, pipe.unet(latents, torch.tensor([300]), fixed_text).sample

    want_text, want_unet = outputs(loop.trainee.pipe)
    ours = build_tiny_pipeline()
    apply_adapters(ours, [(load_adapter(result.adapter_files["kohya"],
                                        pipeline_module_paths(ours)), 1.0, 1.0)])
    got_text, got_unet = outputs(ours)
    torch.testing.assert_close(got_unet, want_unet, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_text, want_text, rtol=0, atol=1e-5)
    theirs = build_tiny_pipeline()
    theirs.load_lora_weights(str(result.adapter_files["diffusers"]))
    their_text, their_unet = outputs(theirs)
    torch.testing.assert_close(their_unet, want_unet, rtol=0, atol=1e-5)
    # The text encoder's magnitudes too (they went missing through transformers 5's loader
    # while written without `.weight`: 0.49 off here)
    torch.testing.assert_close(their_text, want_text, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_locon_with_dora_trains_and_exports(tmp_path):
    from sd_lora.adapters.apply import apply_adapters
    from sd_lora.adapters.files import load_adapter, pipeline_module_paths

    result, loop = train_keeping_loop(dora_job(
        tmp_path, "ld", 'lora.unet_targets=["attn", "conv"]', "lora.train_text_encoder=false",
        'export.formats=["kohya", "diffusers"]'))
    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:
        scale = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.dora_scale")
    assert scale.shape == (32, 1, 1, 1)  # one magnitude per output channel
    w0 = build_tiny_pipeline().unet.down_blocks[0].resnets[0].conv1.weight
    assert float((scale.flatten() - row_norms(w0)).abs().max()) > 1e-3
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        want = loop.trainee.pipe.unet(latents, torch.tensor([300]), text).sample
    ours = build_tiny_pipeline()
    apply_adapters(ours, [(load_adapter(result.adapter_files["kohya"],
                                        pipeline_module_paths(ours)), 1.0, 1.0)])
    theirs = build_tiny_pipeline()  # PEFT's conv magnitudes are (1, out, 1, 1) in that file
    theirs.load_lora_weights(str(result.adapter_files["diffusers"]))
    with torch.no_grad():
        got = ours.unet(latents, torch.tensor([300]), text).sample
        got_theirs = theirs.unet(latents, torch.tensor([300]), text).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_theirs, want, rtol=0, atol=1e-5)


def test_weight_zero_gives_the_base_exactly_even_with_trained_magnitudes():
    config = load_config(None, ["lora.use_dora=true", "lora.train_text_encoder=false"])
    pipe = build_tiny_pipeline()
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        want = pipe.unet(latents, torch.tensor([300]), text).sample
    trained = add_adapters(pipe, config.lora)
    with torch.no_grad():
        for name, param in lora_named_parameters(trained["unet"]):
            param.mul_(1.5 if "magnitude" in name else 1.0).add_(0.01)
        with lora_weight(trained.values(), 0.0):
            off = pipe.unet(latents, torch.tensor([300]), text).sample
        on = pipe.unet(latents, torch.tensor([300]), text).sample
    torch.testing.assert_close(off, want, rtol=0, atol=1e-6)
    assert float((on - want).abs().max()) > 1e-3


@pytest.mark.slow
def test_an_sdxl_dora_run_loads_in_diffusers_with_both_text_encoders(tmp_path):
    """SDXL: the UNet and both text encoders' magnitudes train, and diffusers' SDXL pipeline
    gives the trained conditioning (hidden states and pooled) and UNet output to 1e-5."""
    from sd_lora.models.load import load_pipeline
    from tests.test_sdxl import max_diff, sdxl_outputs

    config = load_config(None, [
        'model.base="tiny-sdxl"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{tmp_path}"',
        "train.name=xd", "train.max_steps=4", "train.batch_size=2", "train.checkpoint_every=0",
        "sample.enabled=false", "report.enabled=false", 'export.formats=["diffusers"]',
        'export.dtype="fp32"', "lora.use_dora=true", "train.learning_rate=2e-2",
        "train.text_encoder_learning_rate=2e-2", "train.text_encoder_2_learning_rate=2e-2",
    ])
    result, loop = train_keeping_loop(config)
    state = read_adapter_state(loop.trainee.models, "sdxl")
    weights = base_weights(loop.trainee.models)
    for component in ("unet", "text_encoder", "text_encoder_2"):  # all three train DoRA
        moved = max(float((m.dora_scale.flatten() - row_norms(weights[component][p])).abs().max())
                    for p, m in state.modules[component].items())
        assert moved > 1e-3, component
    want = sdxl_outputs(loop.trainee.pipe)
    assert max_diff(want, sdxl_outputs(load_pipeline("tiny-sdxl"))) > 1e-3
    fresh = load_pipeline("tiny-sdxl")
    fresh.load_lora_weights(str(result.adapter_files["diffusers"]))
    assert max_diff(sdxl_outputs(fresh), want) < 1e-5


@pytest.mark.slow
def test_a_killed_dora_run_resumes_to_the_same_magnitudes(tmp_path, monkeypatch):
    """The magnitudes and their optimizer moments are in the checkpoint: interrupted at step 3
    and resumed, the run ends with the files of an uninterrupted one (both of them)."""
    from safetensors.torch import load_file

    from sd_lora.train.recipe import train
    from tests.lora_helpers import killed_then_resumed

    def job(out):
        return dora_job(out, "r", "train.max_steps=6", 'lora.unet_targets=["attn", "conv"]')

    straight = train(job(tmp_path / "a"), show_progress=False)
    resumed = killed_then_resumed(job(tmp_path / "b"), monkeypatch)
    for fmt in ("kohya", "comfyui"):
        a, b = load_file(straight.adapter_files[fmt]), load_file(resumed.adapter_files[fmt])
        assert a.keys() == b.keys() and any(k.endswith("dora_scale") for k in a)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, fmt
