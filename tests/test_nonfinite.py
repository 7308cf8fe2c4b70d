"""NaN and inf in training: the step is skipped and counted; too many in a row stop the run
with the likely cause, and the last checkpoint stays as it was."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from sd_lora.objective import Objective
from sd_lora.train.nonfinite import (
    NonFiniteGuard,
    StepSnapshot,
    TrainingDiverged,
    count_nonfinite,
    gradients_finite,
)
from sd_lora.train.recipe import train
from tests.test_train import adapter_tensors, job


def nan_on_calls(monkeypatch, bad_calls, gradient_only_calls=lambda n: False):
    """Make the training loss (`Objective.loss`) NaN on the given (1-based) calls: the NaN goes
    through backward into every LoRA gradient, as an fp16 overflow or a corrupt batch would. On
    `gradient_only_calls` the loss stays finite and only its gradient is NaN (0 * d sqrt(0))."""
    real = Objective.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        value = real(self, *args, **kwargs)
        if gradient_only_calls(calls["n"]):
            return value + 0.0 * torch.sqrt(value * 0.0)
        return value * float("nan") if bad_calls(calls["n"]) else value

    monkeypatch.setattr(Objective, "loss", loss)
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
    with caplog.at_level("WARNING", logger="sd_lora.train.nonfinite"):
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


def poison_updates(monkeypatch, bad_calls):
    """Make AdamW's step write NaN into one weight on the given (1-based) calls, after the real
    update has already moved every weight and moment: a finite loss and finite gradients
    giving a non-finite update, as an optimizer setting that divides by zero would."""
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        result = real(self, *args, **kwargs)
        if bad_calls(calls["n"]):
            with torch.no_grad():
                self.param_groups[0]["params"][0][0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return calls


def test_count_nonfinite_counts_the_tensors_holding_nan_or_inf():
    a, b, c = torch.ones(3), torch.ones(2), torch.ones(4)
    assert count_nonfinite([a, b, c]) == (0, 3)
    b[0], c[3] = float("nan"), float("-inf")
    assert count_nonfinite([a, b, c]) == (2, 3)


@pytest.mark.parametrize("steps_before", [0, 2])  # the first step creates Adam's state
def test_a_step_snapshot_puts_back_the_weights_and_the_whole_optimizer_state(steps_before):
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 0.1}])
    for _ in range(steps_before + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    weights = [p.detach().clone() for p in params]
    state = {i: {k: v.clone() for k, v in optimizer.state[p].items()} for i, p in enumerate(params)}
    if steps_before == 0:
        optimizer.state.clear()
        state = {}
    snapshot = StepSnapshot(optimizer, params)
    optimizer.param_groups[1]["lr"] = 5.0  # a group setting the step could change (Prodigy's d)
    optimizer.step()
    assert not torch.equal(params[0], weights[0])
    snapshot.restore()
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert optimizer.param_groups[1]["lr"] == 0.1
    assert len(optimizer.state) == len(state)
    for i, p in enumerate(params):
        for key, value in state.get(i, {}).items():
            assert torch.equal(optimizer.state[p][key], value), key


@pytest.mark.slow
def test_a_nan_update_is_undone_and_the_run_ends_as_if_its_batch_were_skipped(tmp_path,
                                                                               monkeypatch):
    # The same batch skipped two ways: its loss NaN (nothing is stepped), or its update NaN
    # (stepped, then undone). Equal adapters mean the undo put back the weights and also
    # Adam's moments and step count, and that the schedule did not advance.
    nan_on_calls(monkeypatch, lambda n: n == 3)
    skipped = train(job(tmp_path / "loss", "train.max_steps=5"), show_progress=False)
    monkeypatch.undo()
    calls = poison_updates(monkeypatch, lambda n: n == 3)
    undone = train(job(tmp_path / "update", "train.max_steps=5"), show_progress=False)
    assert calls["n"] == 6  # 5 kept updates and the undone one
    a, b = adapter_tensors(skipped.adapter_files["kohya"]), adapter_tensors(undone.adapter_files["kohya"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the undone step left a trace"
    summary = json.loads((undone.output_dir / "summary.json").read_text())
    assert summary["skipped_nonfinite_steps"] == 1


@pytest.mark.slow
def test_an_update_that_is_always_nan_stops_the_run_saving_no_nan(tmp_path, monkeypatch, caplog):
    # The reported case: Adam with epsilon 0 (the config now refuses it, so it is set on the
    # built optimizer). At step 1 every lora_A gradient is 0 (lora_B starts at 0), and 0 / 0
    # made those weights NaN; they were checkpointed and the run claimed the checkpoint intact.
    import sd_lora.train.recipe as train_steps

    real = train_steps.build_optimizer

    def epsilon_zero(groups, cfg):
        optimizer = real(groups, cfg)
        for group in optimizer.param_groups:
            group["eps"] = 0.0
        return optimizer

    monkeypatch.setattr(train_steps, "build_optimizer", epsilon_zero)
    config = job(tmp_path, "train.max_steps=4", "train.checkpoint_every=1",
                 "train.max_nonfinite_steps=3")
    with caplog.at_level("WARNING", logger="sd_lora.train.nonfinite"), \
            pytest.raises(TrainingDiverged) as err:
        train(config, show_progress=False)
    text = str(err.value)
    assert re.search(r"the update made NaN or inf in \d+ of \d+ LoRA tensors \(finite loss and "
                     r"gradients\); it was undone at 3 steps in a row", text), text
    assert "train.optimizer_args and train.adam_* (epsilon > 0" in text
    assert "Each bad update was undone before anything was saved" in text
    assert "step 1 skipped: the update made NaN" in caplog.text
    assert not list(tmp_path.glob("checkpoint-*")), "a checkpoint of no real step"
    assert not (tmp_path / "t.safetensors").exists()
    rows = (tmp_path / "loss.csv").read_text().splitlines()[1:]
    assert rows == []  # no step was kept
