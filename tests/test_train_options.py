"""Training options that change how a step is computed: each shown to have its effect."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from sd_lora.config import LoraConfig
from sd_lora.models.builtin.tiny import build_tiny_pipeline
from sd_lora.train.recipe import TrainingLoop, add_adapters, enable_gradient_checkpointing, train
from tests.lora_helpers import fill_lora_B
from tests.test_train import job


def _lora_grads(gradient_checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    pipe = build_tiny_pipeline()
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    trained = add_adapters(pipe, LoraConfig())
    for model in trained.values():
        model.train()
    fill_lora_B(trained.values())  # B starts at zero; make every path carry gradient
    if gradient_checkpointing:
        enable_gradient_checkpointing(trained)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeddings = pipe.text_encoder(ids)[0].repeat(2, 1, 1)
    pipe.unet(latents, torch.tensor([10, 500]), embeddings).sample.pow(2).mean().backward()
    return {f"{c}.{n}": p.grad.clone() for c, m in trained.items()
            for n, p in m.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, checkpointed = _lora_grads(False), _lora_grads(True)
    assert plain.keys() == checkpointed.keys()
    assert any(k.startswith("text_encoder.") and v.abs().sum() > 0 for k, v in plain.items())
    worst = max(float((plain[k] - checkpointed[k]).abs().max()) for k in plain)
    assert worst < 1e-6, worst


def _capture_pipe(monkeypatch):
    captured = {}
    original = TrainingLoop.run

    def run(self, *args, **kwargs):
        captured["pipe"] = self.trainee.pipe
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrainingLoop, "run", run)
    return captured


@pytest.mark.slow
def test_bf16_keeps_the_base_in_bf16_and_trains_lora_in_fp32(tmp_path, monkeypatch):
    captured = _capture_pipe(monkeypatch)
    result = train(job(tmp_path, "train.mixed_precision=bf16", "train.max_steps=3",
                       "train.eval_images=2"),
                   show_progress=False)
    pipe = captured["pipe"]
    dtypes = {n: p.dtype for n, p in pipe.unet.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert pipe.vae.dtype == torch.bfloat16  # bf16 has fp32's range: no fp32 VAE needed
    assert math.isfinite(result.eval_loss_after)
    loss_rows = (result.output_dir / "loss.csv").read_text().splitlines()[1:]
    assert all(math.isfinite(float(r.split(",")[1])) for r in loss_rows)


def test_the_vae_can_be_kept_in_fp32_under_bf16(tmp_path, monkeypatch):
    captured = _capture_pipe(monkeypatch)
    result = train(job(tmp_path, "train.mixed_precision=bf16", "train.max_steps=2",
                       'model.vae_precision="fp32"', "train.eval_images=2"), show_progress=False)
    assert captured["pipe"].vae.dtype == torch.float32
    assert next(captured["pipe"].unet.parameters()).dtype == torch.bfloat16
    assert math.isfinite(result.eval_loss_after)


@pytest.mark.slow
def test_v_prediction_is_trained_and_recorded(tmp_path, monkeypatch):
    captured = _capture_pipe(monkeypatch)
    result = train(job(tmp_path, "model.prediction_type=v_prediction", "train.max_steps=2"),
                   show_progress=False)
    assert captured["pipe"].scheduler.config.prediction_type == "v_prediction"
    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.prediction_type"] == "v"  # the SAI model spec's spelling
    assert metadata["ss_v_parameterization"] == "True"


def test_regularization_images_fill_as_many_items_as_the_style_with_their_own_weight():
    from sd_lora.config import load_config
    from sd_lora.data.loader import make_dataloader, regularization_samples
    from sd_lora.train.preflight import check_job
    from tests.test_world import TOY_DATA

    job = load_config(None, [f'data.path="{TOY_DATA / "outline"}"',
                             f'data.regularization="{TOY_DATA / "heldout" / "plain"}"',
                             "data.regularization_weight=4.0"])
    data = job.data
    check = check_job(job)  # 32 outline images; the folder has 16 plain ones
    scan = check.data
    reg = regularization_samples(data, scan, check.regularization)
    assert len(reg) == 16 and all(s.repeats == 2 and s.loss_weight == 4.0 for s in reg)
    assert not any(s.caption.startswith("zkoutline") for s in reg)
    assert check.items_per_epoch() == 64
    small = check_job(load_config(None, [f'data.path="{TOY_DATA / "heldout" / "outline"}"',
                                         f'data.regularization="{TOY_DATA / "plain"}"']))
    cut = regularization_samples(small.config.data, small.data, small.regularization)
    assert small.items_per_epoch() == 32
    assert len(cut) == 16 and all(s.repeats == 1 and s.loss_weight == 1.0 for s in cut)
    dataset, loader = make_dataloader(scan.samples + reg, 64, data,
                                      load_config(None, ["train.batch_size=8"]).train)
    weights = torch.cat([batch["loss_weight"] for batch in loader])
    captions = [c for batch in loader for c in batch["caption"]]
    assert len(dataset) == 64 and sorted(set(weights.tolist())) == [1.0, 4.0]
    for weight, caption in zip(weights.tolist(), captions):  # each item keeps its own weight
        assert caption.startswith("zkoutline") == (weight == 1.0)


def test_noise_offset_shifts_each_image_and_channel_by_one_constant():
    from sd_lora.objective import add_noise_offset

    noise = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert add_noise_offset(noise, 0.0, torch.Generator().manual_seed(1)) is noise
    shifted = add_noise_offset(noise, 0.1, torch.Generator().manual_seed(1))
    shift = shifted - noise
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert 0.07 < shift[:, :, 0, 0].std().item() < 0.13  # scale 0.1, over 256 draws


def test_regularization_caption_dropout_empties_that_share_of_captions_reproducibly():
    from sd_lora.config import ConfigError, load_config
    from sd_lora.data import ImageCaptionDataset, scan_dataset
    from tests.test_world import TOY_DATA

    plain = scan_dataset(TOY_DATA / "plain").samples
    dropped = [replace(s, caption_dropout=0.25) for s in plain] * 8  # 256 items
    dataset = ImageCaptionDataset(dropped, 64, seed=3)
    captions = [dataset[i]["caption"] for i in range(len(dataset))]
    share = captions.count("") / len(captions)
    assert 0.17 < share < 0.33, share
    assert captions == [dataset[i]["caption"] for i in range(len(dataset))]  # same every time
    dataset.set_epoch(1)
    assert captions != [dataset[i]["caption"] for i in range(len(dataset))]  # a new draw
    kept = ImageCaptionDataset(plain, 64, seed=3)
    assert all(kept[i]["caption"] == s.caption for i, s in enumerate(plain))
    assert torch.equal(kept[5]["pixel_values"], ImageCaptionDataset(dropped, 64, seed=3)[5]["pixel_values"])
    with pytest.raises(ConfigError, match="data.regularization is empty"):
        load_config(None, ["data.regularization_caption_dropout=0.2"])
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\]"):
        load_config(None, ['data.regularization="x"', "data.regularization_caption_dropout=1.5"])


def test_regularization_target_base_trains_toward_the_adapter_off_prediction():
    """Output preservation: preserved items' target is what the base (UNet and text encoder,
    adapter off) predicts for the same noisy latent and caption; other items keep the noise."""
    from sd_lora.config import ConfigError, load_config
    from sd_lora.models.builtin.tiny import sd1_scheduler_config
    from sd_lora.models.text import encode_prompts, tokenize
    from sd_lora.objective import Objective, denoising_loss, target, training_schedule
    from sd_lora.train.loop import RunSetup, Trainee

    torch.manual_seed(0)
    pipe = build_tiny_pipeline()
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    trained = add_adapters(pipe, LoraConfig())
    schedule = training_schedule(sd1_scheduler_config(), "epsilon")
    loop = TrainingLoop(Trainee(pipe, trained, dict(trained), None, None),
                        RunSetup(None, None, Objective(schedule), None, 64, []))
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([50, 400, 900])
    ids = tokenize(pipe.tokenizer, ["zkpastel, a red circle", "a red circle", "a blue square"])
    batch = {"preserve": torch.tensor([False, True, True])}
    assert loop.preserved_targets({"preserve": torch.zeros(3, dtype=torch.bool)},
                                  latents, noise, t, ids) is None

    # A fresh adapter (B = 0) is the base: preserved items start at zero loss, style ones do not.
    wanted = loop.preserved_targets(batch, latents, noise, t, ids)
    with torch.no_grad():
        embeddings = encode_prompts(trained["text_encoder"], ids)
        per_item = [float(denoising_loss(pipe.unet, schedule, latents[i:i + 1],
                                         embeddings[i:i + 1], noise[i:i + 1], t[i:i + 1],
                                         wanted=wanted[i:i + 1])) for i in range(3)]
    assert per_item[0] > 0.01 and per_item[1] < 1e-10 and per_item[2] < 1e-10

    fill_lora_B(trained.values())  # a trained adapter: its targets stay the base's predictions
    moved = loop.preserved_targets(batch, latents, noise, t, ids)
    torch.testing.assert_close(moved, wanted, rtol=0, atol=1e-6)
    assert torch.equal(moved[0], target(schedule, latents, noise, t)[0])
    with torch.no_grad():
        adapted = pipe.unet(schedule.add_noise(latents, noise, t), t,
                            encode_prompts(trained["text_encoder"], ids)).sample
    assert (adapted[1:] - moved[1:]).abs().max() > 1e-3  # the loss sees the adapter's change
    with pytest.raises(ConfigError, match=r"regularization_target = 'model' is not allowed; use one of \('noise', 'base'\)"):
        load_config(None, ['data.regularization="x"', 'data.regularization_target="model"'])
    with pytest.raises(ConfigError, match="data.regularization is empty"):
        load_config(None, ['data.regularization_target="base"'])
