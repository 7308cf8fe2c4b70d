"""Training options that change how a step is computed: each shown to have its effect."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from sd_lora.config import LoraConfig
from sd_lora.tiny import build_tiny_pipeline
from sd_lora.train import TrainingLoop, add_adapters, enable_gradient_checkpointing, train
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
        captured["pipe"] = self.pipe
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrainingLoop, "run", run)
    return captured


@pytest.mark.slow
def test_bf16_keeps_the_base_in_bf16_and_trains_lora_in_fp32(tmp_path, monkeypatch):
    captured = _capture_pipe(monkeypatch)
    result = train(job(tmp_path, "train.mixed_precision=bf16", "train.max_steps=3"),
                   show_progress=False)
    pipe = captured["pipe"]
    dtypes = {n: p.dtype for n, p in pipe.unet.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert math.isfinite(result.eval_loss_after)
    loss_rows = (result.output_dir / "loss.csv").read_text().splitlines()[1:]
    assert all(math.isfinite(float(r.split(",")[1])) for r in loss_rows)


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
