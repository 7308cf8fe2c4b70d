"""End-to-end training on the tiny base: learning, exact resume, exports that load elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd_lora.config import load_config
from sd_lora.train.recipe import train
from tests.lora_helpers import interrupt_at, train_keeping_loop

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"


def job(tmp_path: Path, *extra: str):
    """A small, fast job on the sample dataset; `extra` are dotted overrides."""
    return load_config(None, [
        'model.base="tiny"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{tmp_path}"',
        "train.name=t",
        "train.max_steps=6", "train.batch_size=2", "train.checkpoint_every=0",
        "sample.steps=2", "sample.every=0", 'export.formats=["kohya", "diffusers"]',
        'export.dtype="fp32"', *extra,
    ])


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
def test_training_lowers_the_fixed_evaluation_loss(tmp_path):
    result = train(job(tmp_path, "train.max_steps=60", "train.batch_size=4",
                       "train.learning_rate=3e-3", "train.text_encoder_learning_rate=1e-3"),
                   show_progress=False)
    # Same images, timesteps and noise before and after: a drop is learning, not luck.
    assert result.eval_loss_after < 0.8 * result.eval_loss_before, (
        result.eval_loss_before, result.eval_loss_after)
    out = result.output_dir
    for name in ("t.safetensors", "t-diffusers/pytorch_lora_weights.safetensors", "loss.csv",
                 "loss.png", "samples/final.png", "summary.json", "config.toml",
                 "dataset_report.txt"):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    assert len((out / "loss.csv").read_text().splitlines()) == 61


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_at_the_same_adapter(tmp_path, monkeypatch):
    # Cosine warmup, accumulation, random flips and LoRA dropout: every piece of state matters.
    extra = ("train.max_steps=8", "train.gradient_accumulation_steps=2", "data.random_flip=true",
             "train.lr_scheduler=cosine", "train.lr_warmup_steps=2", "lora.dropout=0.1",
             "train.learning_rate=1e-3", "train.eval_images=2")
    straight = train(job(tmp_path / "straight", *extra), show_progress=False)

    interrupt_at(3, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(job(tmp_path / "resumed", *extra), show_progress=False)
    assert (tmp_path / "resumed" / "checkpoint-000003").is_dir()
    monkeypatch.undo()
    resumed = train(job(tmp_path / "resumed", *extra), resume=True, show_progress=False)

    a = adapter_tensors(straight.adapter_files["kohya"])
    b = adapter_tensors(resumed.adapter_files["kohya"])
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst  # fp32 export; same batches, noise and schedule
    assert resumed.eval_loss_after == pytest.approx(straight.eval_loss_after, abs=1e-6)


@pytest.mark.slow
def test_exported_file_reproduces_the_trained_model_in_diffusers(tmp_path):
    from sd_lora.models.load import load_pipeline
    from sd_lora.train.recipe import load_frozen_base  # noqa: F401  (same loader the trainer used)

    config = job(tmp_path, "train.max_steps=4", "train.learning_rate=1e-2",
                 "train.text_encoder_learning_rate=1e-2")
    result, loop = train_keeping_loop(config)
    trained = loop.trainee.pipe
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 8)
    ids = trained.tokenizer(["zkstripes, a red circle"], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    t = torch.tensor([500])
    with torch.no_grad():
        want_text = trained.text_encoder(ids)[0]
        want_unet = trained.unet(latents, t, want_text).sample

    for fmt in ("kohya", "diffusers"):
        fresh = load_pipeline("tiny")
        fresh.load_lora_weights(str(result.adapter_files[fmt]))
        with torch.no_grad():
            got_text = fresh.text_encoder(ids)[0]
            got_unet = fresh.unet(latents, t, got_text).sample
        assert (got_text - want_text).abs().max() < 1e-5, fmt
        assert (got_unet - want_unet).abs().max() < 1e-5, fmt
        base = load_pipeline("tiny")
        with torch.no_grad():
            base_unet = base.unet(latents, t, base.text_encoder(ids)[0]).sample
        assert (base_unet - want_unet).abs().max() > 1e-3, "the adapter must change the output"
