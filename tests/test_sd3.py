"""Stable Diffusion 3 / 3.5: the MMDiT transformer, three text encoders, rectified flow.

The tiny SD3 pipeline (`tiny-sd3`) has SD3.5 Medium's structure (both streams, MMDiT-X blocks
with `attn2`, a context_pre_only last block, CLIP-L, CLIP-G and a small T5 with a working
tokenizer), so its module names and LoRA keys are a real SD3.5 model's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd_lora.config import load_config
from sd_lora.models.families import model_family, model_variant, prediction_type_of
from sd_lora.models.load import load_pipeline
from sd_lora.models.text import encode_all, text_encoders_of, tokenize_all, tokenizers_of
from tests.lora_helpers import killed_then_resumed, train_keeping_loop

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"
FP32_TOLERANCE = 1e-5
PROMPTS = ["zkstripes, a red circle", "two blue squares"]


@torch.no_grad()
def sd3_outputs(pipe) -> dict[str, torch.Tensor]:
    """The conditioning (all three encoders) and the transformer's prediction for fixed prompts,
    latents and noise levels."""
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 16, 8, 8, generator=gen)
    conditioning = encode_all(text_encoders_of(pipe), tokenize_all(tokenizers_of(pipe), PROMPTS))
    prediction = pipe.transformer(hidden_states=latents, timestep=torch.tensor([250.0, 750.0]),
                                  encoder_hidden_states=conditioning.hidden_states,
                                  pooled_projections=conditioning.pooled).sample
    return {"hidden": conditioning.hidden_states, "pooled": conditioning.pooled,
            "prediction": prediction}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def sd3_job(tmp_path, *extra):
    return load_config(None, [
        'model.base="tiny-sd3"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{tmp_path}"',
        "train.name=sd3", "train.max_steps=4", "train.batch_size=2", "train.checkpoint_every=0",
        "sample.steps=2", "sample.every=0", 'export.formats=["kohya", "diffusers"]',
        'export.dtype="fp32"', "train.learning_rate=1e-2", "train.text_encoder_learning_rate=1e-2",
        "report.enabled=false", *extra,
    ])


def test_tiny_sd3_is_an_sd35_medium_shaped_flow_model():
    pipe = load_pipeline("tiny-sd3")
    assert (model_family(pipe), model_variant(pipe), prediction_type_of(pipe)) == ("sd3", "5-medium", "flow")
    names = {n for n, _ in pipe.transformer.named_modules()}
    assert {"transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn.add_q_proj",
            "transformer_blocks.2.attn.to_q"} <= names
    assert "transformer_blocks.2.attn.to_add_out" not in names  # the last block: context_pre_only
    ids = tokenize_all(tokenizers_of(pipe), PROMPTS)
    assert ids.shape == (2, 3, 256)
    ours = encode_all(text_encoders_of(pipe), ids)
    theirs = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False)
    assert torch.equal(ours.hidden_states, theirs[0]) and torch.equal(ours.pooled, theirs[2])


def test_tiny_sd3_trains_and_diffusers_loads_its_exports_like_the_trained_model(tmp_path):
    result, loop = train_keeping_loop(sd3_job(tmp_path))
    groups = [g["lr"] for g in loop.trainee.optimizer.param_groups]
    assert list(loop.trainee.trained) == ["transformer", "text_encoder", "text_encoder_2"]
    assert groups == [1e-2, 1e-2, 1e-2]
    want = sd3_outputs(loop.trainee.pipe)
    assert max_diff(want, sd3_outputs(load_pipeline("tiny-sd3"))) > 1e-3  # it learned something
    with safe_open(str(result.adapter_files["diffusers"]), "pt") as f:
        keys = set(f.keys())
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.attn2.to_q.lora_B.weight" in keys
    fresh = load_pipeline("tiny-sd3")
    fresh.load_lora_weights(str(result.adapter_files["diffusers"]))
    diff = max_diff(sd3_outputs(fresh), want)
    print(f"diffusers file: diffusers' StableDiffusion3Pipeline vs the trained model {diff:.1e}")
    assert diff < FP32_TOLERANCE
    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:
        kohya, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_joint_blocks_1_context_block_attn_qkv.alpha" in kohya
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight" in kohya
    assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj.lora_up.weight" in kohya
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert metadata["ss_base_model_version"] == "5-medium"
    assert metadata["ss_network_module"] == "networks.lora_sd3"  # sd-scripts' SD3 network
    assert "modelspec.prediction_type" not in metadata  # modelspec has no value for flow
    fresh = load_pipeline("tiny-sd3")
    comfyui_apply(fresh, kohya)
    diff = max_diff(sd3_outputs(fresh), want)
    print(f"kohya file: ComfyUI's formula on the original MMDiT vs the trained model {diff:.1e}")
    assert diff < FP32_TOLERANCE


def test_sd3_resumed_after_a_kill_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from sd_lora.train.recipe import train

    def job(out):  # EMA and text-encoder caching too: their state resumes with the run
        return sd3_job(out, "train.max_steps=5", "train.checkpoint_every=0", "train.ema_decay=0.9",
                       "lora.train_text_encoder=false", "data.cache_text_encoder_outputs=true",
                       'train.timestep_sampling="mode"')

    straight = train(job(tmp_path / "a"), show_progress=False)
    resumed = killed_then_resumed(job(tmp_path / "b"), monkeypatch)
    for fmt in ("kohya", "diffusers"):
        a, b = load_file(straight.adapter_files[fmt]), load_file(resumed.adapter_files[fmt])
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0, fmt


def test_diffusers_reads_nothing_of_an_sd3_kohya_file(tmp_path):
    """diffusers 0.42.1's SD3 loader has no kohya converter: it warns and adapts no layer. So
    the diffusers export is the file for diffusers; the kohya one is checked by ComfyUI's
    formula below. (If a diffusers release starts reading it, this test says so.)"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sd_lora.adapters.files import save_adapter
    from sd_lora.lora.inject import add_lora, read_adapter_state
    from tests.lora_helpers import fill_lora_B

    pipe = load_pipeline("tiny-sd3")
    add_lora(pipe.transformer, "transformer", ("attn",), 4, 4.0)
    fill_lora_B([pipe.transformer])
    path = save_adapter(read_adapter_state({"transformer": pipe.transformer}, "sd3"),
                        tmp_path / "k.safetensors", format="kohya", dtype=torch.float32)
    fresh = load_pipeline("tiny-sd3")
    fresh.load_lora_weights(str(path))
    assert not any(isinstance(m, BaseTunerLayer) for m in fresh.transformer.modules())


def comfyui_apply(pipe, kohya: dict[str, torch.Tensor], strength: float = 1.0) -> None:
    """Apply a kohya file the way ComfyUI does (comfy/lora.py's key map and weight patch):
    `lora_unet_<name>` patches `diffusion_model.<name>.weight` of the ORIGINAL MMDiT state dict,
    `lora_te1_`/`lora_te2_` CLIP-L's/CLIP-G's `text_model` weights, each by
    strength * alpha / rank * up @ down (rank: lora_down's rows). The MMDiT is patched in its
    original layout (names from our table, the layout proved by diffusers' converter in
    test_sd3_formats) and converted back with diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from sd_lora.formats.sd3_checkpoint import TRANSFORMER_PREFIX, transformer_to_original

    original = {k.removeprefix(TRANSFORMER_PREFIX): v
                for k, v in transformer_to_original(pipe.transformer.state_dict()).items()}
    encoders = {"lora_te1_": pipe.text_encoder, "lora_te2_": pipe.text_encoder_2}
    for key in [k for k in kohya if k.endswith(".lora_down.weight")]:
        name = key.removesuffix(".lora_down.weight")
        down, up = kohya[key].double(), kohya[f"{name}.lora_up.weight"].double()
        alpha = float(kohya[f"{name}.alpha"]) if f"{name}.alpha" in kohya else down.shape[0]
        delta = strength * alpha / down.shape[0] * (up @ down)
        if name.startswith("lora_unet_"):
            target = next(k for k in original if k.endswith(".weight")
                          and k.removesuffix(".weight").replace(".", "_") == name.removeprefix("lora_unet_"))
            original[target] = (original[target].double() + delta).float()
            continue
        prefix = next(p for p in encoders if name.startswith(p))
        model = encoders[prefix]
        module = next(m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and
                      ("text_model_" + n.replace(".", "_")).endswith(name.removeprefix(prefix)))
        module.weight.data = (module.weight.double() + delta).float()
    pipe.transformer.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(original))


# --- the rectified-flow objective, against diffusers' own SD3 pieces ----------------------------


@pytest.mark.parametrize("sampling", ["logit_normal", "mode", "uniform"])
def test_flow_draws_are_diffusers_sd3_densities_then_the_shift(sampling):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from sd_lora.objective.flow import FlowSchedule, flow_density_draw, sample_flow_timesteps

    ours = flow_density_draw((64,), torch.Generator().manual_seed(5), sampling, 0.0, 1.0, 1.29)
    theirs = compute_density_for_timestep_sampling(sampling, 64, 0.0, 1.0, 1.29,
                                                   generator=torch.Generator().manual_seed(5))
    assert torch.allclose(ours, theirs, atol=1e-6)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    schedule = FlowSchedule.from_scheduler_config(scheduler.config)
    grid = torch.linspace(1.0, 1 / 1000, 1000)  # the scheduler's unshifted sigmas
    assert torch.allclose(schedule.shifted(grid), scheduler.sigmas, atol=1e-6)
    timesteps = sample_flow_timesteps(schedule, (64,), torch.Generator().manual_seed(5), sampling)
    assert torch.allclose(timesteps, schedule.shifted(ours) * 1000, atol=1e-3)


def test_flow_noising_and_target_are_the_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sd_lora.objective import target
    from sd_lora.objective.flow import FlowSchedule

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    schedule = FlowSchedule.from_scheduler_config(scheduler.config, shift=2.0)
    assert schedule.config.shift == 2.0  # train.flow_shift replaces the scheduler's
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 4, 4, generator=gen), torch.randn(3, 16, 4, 4, generator=gen)
    t = scheduler.timesteps[[0, 500, 999]]
    schedule = FlowSchedule.from_scheduler_config(scheduler.config)
    ours = schedule.add_noise(x0, noise, t)
    theirs = torch.cat([scheduler.scale_noise(x0[i:i + 1], t[i:i + 1], noise[i:i + 1])
                        for i in range(3)])
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(target(schedule, x0, noise, t), noise - x0)


@pytest.mark.parametrize("option", ["train.min_snr_gamma=5", "train.debiased_estimation=true",
                                    "train.zero_terminal_snr=true"])
def test_ddpm_only_options_are_refused_for_sd3_naming_why(tmp_path, option, capsys):
    from sd_lora.cli.main import main
    from sd_lora.errors import UserError
    from sd_lora.train.recipe import train

    with pytest.raises(UserError, match=r"does not apply to SD3 bases.*rectified flow"):
        train(sd3_job(tmp_path, option), show_progress=False)
    # `sd-lora check` says so too: the family is known from the base's name, before any load
    assert main(["check", str(SAMPLE_DATA), "--set", 'model.base="tiny-sd3"', "--set", option]) == 2
    assert "does not apply to SD3 bases" in capsys.readouterr().err


def test_flow_options_are_refused_for_unet_bases_and_v_prediction_for_sd3(tmp_path):
    from sd_lora.errors import UserError
    from sd_lora.models.bases import BaseModelError
    from sd_lora.train.recipe import train

    job = sd3_job(tmp_path, 'model.base="tiny"', 'train.timestep_sampling="uniform"')
    with pytest.raises(UserError, match=r"train.timestep_sampling applies to SD3 bases"):
        train(job, show_progress=False)
    with pytest.raises(BaseModelError, match=r"SD3 bases are trained with rectified flow"):
        load_pipeline("tiny-sd3", prediction_type="v_prediction")


def test_sd3_trains_with_buckets_validation_and_the_report(tmp_path):
    """What the other families have keeps working for SD3: aspect-ratio buckets (SD3 has no size
    conditioning: the transformer reads any patch grid), held-out validation, the quality report."""
    import json

    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        size = (96, 64) if i % 2 else (64, 96)
        Image.new("RGB", size, (40 * i, 200 - 20 * i, 90)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"zkstripes, shape {i}")
    job = sd3_job(tmp_path / "run", f'data.path="{data}"', "data.enable_bucket=true", "data.resolution=96",
                  "data.bucket_reso_steps=32", "data.validation_split=0.25",
                  "train.validation_every=2", "report.enabled=true", "report.max_images=2")
    result, loop = train_keeping_loop(job)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["validation"]["best_step"] in (2, 4)
    assert result.report is not None and (result.output_dir / "report.png").is_file()
    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:
        buckets = json.loads(f.metadata()["ss_bucket_info"])
    assert len(buckets["buckets"]) == 2, buckets  # both shapes trained at their own size


def test_an_sd3_folder_loads_and_trains_without_t5_reading_none_of_it(tmp_path):
    """model.load_t5 = false: T5's folder is never read (here: its weights are gone), zeros
    stand in its place as in diffusers' pipeline, and training runs on the CLIPs alone."""
    import shutil

    folder = tmp_path / "sd3-folder"
    load_pipeline("tiny-sd3").save_pretrained(folder)
    with_t5 = load_pipeline(str(folder))
    assert with_t5.text_encoder_3 is not None  # the folder loads whole by default
    shutil.rmtree(folder / "text_encoder_3")
    pipe = load_pipeline(str(folder), load_t5=False)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    ours = encode_all(text_encoders_of(pipe), tokenize_all(tokenizers_of(pipe), PROMPTS))
    theirs = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False)
    assert torch.equal(ours.hidden_states, theirs[0]) and torch.equal(ours.pooled, theirs[2])
    assert not ours.hidden_states[:, 77:].any()  # T5's part: zeros
    result = train_keeping_loop(sd3_job(tmp_path / "run", f'model.base="{folder}"',
                                        "model.load_t5=false", "train.max_steps=2"))[0]
    assert result.steps == 2 and result.adapter_files["kohya"].is_file()


def test_sd3_dora_trains_into_the_diffusers_file_and_is_refused_for_kohya_before_loading(tmp_path):
    from sd_lora.errors import UserError
    from sd_lora.train.recipe import train

    with pytest.raises(UserError, match=r"cannot carry DoRA's magnitudes"):
        train(sd3_job(tmp_path / "k", "lora.use_dora=true"), show_progress=False)
    assert not (tmp_path / "k").exists()  # refused before anything was made
    job = sd3_job(tmp_path / "d", "lora.use_dora=true", 'export.formats=["diffusers"]',
                  "train.max_steps=2")
    result, loop = train_keeping_loop(job)
    fresh = load_pipeline("tiny-sd3")
    fresh.load_lora_weights(str(result.adapter_files["diffusers"]))
    assert max_diff(sd3_outputs(fresh), sd3_outputs(loop.trainee.pipe)) < FP32_TOLERANCE


def test_sd3_trains_from_the_command_line(tmp_path, capsys):
    from sd_lora.cli.main import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(SAMPLE_DATA), "--base", "tiny-sd3", "--output", str(out),
                 "--name", "s", "--max-steps", "3", "--no-progress",
                 "--set", "report.enabled=false", "--set", "sample.steps=2"]) == 0
    said = capsys.readouterr().out
    assert "base tiny-sd3 (the built-in random SD3.5-topology test model" in said
    assert "trained 3 steps" in said and "(then choose base 'tiny-sd3')" in said
    with safe_open(str(out / "s.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert (out / "samples" / "final.png").is_file() and (out / "loss.png").is_file()
