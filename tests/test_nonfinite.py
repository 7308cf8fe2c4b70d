"""NaN and inf in training: the step is skipped and counted; too many in a row stop the run
with the likely cause, and the last checkpoint stays as it was."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import sd_lora.loop as train_module  # the step loop: where the loss is computed
from sd_lora.nonfinite import NonFiniteGuard, TrainingDiverged, gradients_finite
from sd_lora.train import train
from tests.test_train import job


def nan_on_calls(monkeypatch, bad_calls, gradient_only_calls=lambda n: False):
    """Make denoising_loss NaN on the given (1-based) calls: the NaN goes through backward
    into every LoRA gradient, as an fp16 overflow or a corrupt batch would. On
    `gradient_only_calls` the loss stays finite and only its gradient is NaN (0 * d sqrt(0))."""
    real = train_module.denoising_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        if gradient_only_calls(calls["n"]):
            return value + 0.0 * torch.sqrt(value * 0.0)
        return value * float("nan") if bad_calls(calls["n"]) else value

    monkeypatch.setattr(train_module, "denoising_loss", loss)
    return calls


def test_gradients_finite_finds_nan_and_inf():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    assert gradients_finite([p, q])  # no gradients yet
    p.grad, q.grad = torch.ones(3), torch.ones(2)
    assert gradients_finite([p, q])
    q.grad[1] = float("inf")
    assert not gradients_finite([p, q])
    q.grad[1] = float("nan")
    assert not gradients_finite([p, q])


def test_guard_counts_and_stops_after_the_limit_naming_the_causes():
    guard = NonFiniteGuard(3, "fp16", 1e-3)
    guard.bad(5, float("nan"), "the loss is nan")
    guard.good()
    guard.bad(7, float("nan"), "the loss is nan")
    guard.bad(7, float("inf"), "the loss is inf")
    with pytest.raises(TrainingDiverged) as err:
        guard.bad(7, float("nan"), "the loss is nan")
    text = str(err.value)
    assert "3 steps in a row" in text and "4 skipped in all" in text
    assert "--mixed-precision bf16" in text and "train.learning_rate = 0.001; try 0.0001" in text
    assert "last checkpoint is intact" in text
    assert "fp16" not in NonFiniteGuard(3, "no", 1e-3).message(1, "x")


@pytest.mark.slow
def test_a_nan_step_is_skipped_and_counted_and_the_run_finishes(tmp_path, monkeypatch, caplog):
    calls = nan_on_calls(monkeypatch, lambda n: n == 3, gradient_only_calls=lambda n: n == 4)
    with caplog.at_level("WARNING", logger="sd_lora.nonfinite"):
        result = train(job(tmp_path, "train.max_steps=6"), show_progress=False)
    assert calls["n"] == 8  # 6 real updates, 2 batches skipped
    assert "step 3 skipped: the loss is nan (loss nan)" in caplog.text
    # the gradient-only fault: a finite loss, caught by the gradients
    assert re.search(r"step 3 skipped: the gradients hold NaN or inf \(loss \d\.\d+\)", caplog.text)
    assert result.steps == 6
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["skipped_nonfinite_steps"] == 2
    rows = (result.output_dir / "loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(float(r.split(",")[1])) for r in rows)
    weights = load_file(result.adapter_files["kohya"])
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_nan_that_keeps_coming_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, lambda n: n > 4)
    config = job(tmp_path, "train.max_steps=20", "train.checkpoint_every=2",
                 "train.max_nonfinite_steps=3", "train.checkpoints_keep=0")
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row \(from step 5 to 5"):
        train(config, show_progress=False)
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-000002", "checkpoint-000004"]
    lora = load_file(tmp_path / "checkpoint-000004" / "lora.safetensors")
    assert all(torch.isfinite(t).all() for t in lora.values())
    assert not (tmp_path / "t.safetensors").exists()  # no export of a failed run
