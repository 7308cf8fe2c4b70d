"""Validation: a fixed held-out loss, the best adapter kept, early stopping, a stable split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sd_lora.config import ConfigError, load_config
from sd_lora.data import scan_dataset
from sd_lora.train.recipe import train
from sd_lora.train.validation import ValidationState, Validator, split_samples

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"


def test_the_split_is_stable_exclusive_and_follows_content():
    samples = scan_dataset(SAMPLE_DATA).samples
    train_a, held_a = split_samples(samples, 0.25, seed=0)
    train_b, held_b = split_samples(list(reversed(samples)), 0.25, seed=0)
    assert len(held_a) == 4 and {s.image for s in held_a} == {s.image for s in held_b}
    assert not {s.image for s in held_a} & {s.image for s in train_a}
    assert len(train_a) + len(held_a) == len(samples)
    _, other_seed = split_samples(samples, 0.25, seed=1)
    assert {s.image for s in other_seed} != {s.image for s in held_a}
    assert split_samples(samples[:1], 0.5, seed=0) == (samples[:1], [])  # never the only image
    with pytest.raises(ConfigError, match="validation_split"):
        load_config(None, ["data.validation_split=1.5"])


def test_the_validator_keeps_the_best_and_stops_after_its_patience(tmp_path):
    losses = iter([0.5, 0.4, 0.45, 0.41, 0.42])
    exported = []
    validator = Validator(lambda: next(losses), every=10, patience=3, output_dir=tmp_path,
                          export_best=exported.append, resumed=False)
    results = [validator.validate(step) for step in (10, 20, 30, 40, 50)]
    assert exported == [10, 20]  # each new best, only then
    assert [stop for _, stop in results] == [False, False, False, False, True]
    assert ValidationState.read(tmp_path) == ValidationState(0.4, 20, 3)
    rows = list(csv.DictReader((tmp_path / "validation.csv").open()))
    assert [r["best"] for r in rows] == ["1", "1", "0", "0", "0"]
    again = Validator(lambda: 0.39, 10, 3, tmp_path, exported.append, resumed=True)
    assert again.state.best_loss == 0.4  # a resumed run carries on from the saved best
    assert again.validate(60) == (0.39, False) and exported[-1] == 60


def job(tmp_path, *extra):
    return load_config(None, [
        'model.base="tiny"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{tmp_path}"',
        "train.name=v", "train.batch_size=2", "train.checkpoint_every=0", "sample.every=0",
        "sample.steps=2", "report.enabled=false", 'export.dtype="fp32"',
        "data.validation_split=0.25", "train.validation_every=2", *extra,
    ])


@pytest.mark.slow
def test_a_run_logs_validation_keeps_the_best_adapter_and_can_stop_early(tmp_path):
    # A learning rate this high makes the held-out loss rise after a few steps: the best
    # adapter then differs from the last, and patience 2 stops the run before max_steps.
    result = train(job(tmp_path, "train.max_steps=40", "train.learning_rate=0.5",
                       "train.text_encoder_learning_rate=0.5", "train.early_stopping_patience=2"),
                   show_progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())["validation"]
    rows = list(csv.DictReader((tmp_path / "validation.csv").open()))
    losses = {int(r["step"]): float(r["validation_loss"]) for r in rows}
    assert summary["best_step"] == min(losses, key=losses.get)
    assert summary["best_loss"] == pytest.approx(min(losses.values()), abs=1e-6)
    assert summary["stopped_early"] and result.steps < 40
    assert [r["best"] for r in rows][-2:] == ["0", "0"]
    best = load_file(tmp_path / "v-best.safetensors")
    last = load_file(tmp_path / "v.safetensors")
    assert best.keys() == last.keys()
    assert max(float((best[k] - last[k]).abs().max()) for k in best) > 0


def test_held_out_images_never_train(tmp_path, monkeypatch):
    from sd_lora.train import recipe as train_module

    trained_on = []
    original = train_module.make_dataset

    def spy(samples, *args, **kwargs):
        trained_on.extend(s.image for s in samples)
        return original(samples, *args, **kwargs)

    monkeypatch.setattr(train_module, "make_dataset", spy)
    train(job(tmp_path, "train.max_steps=2"), show_progress=False)
    _, held = split_samples(scan_dataset(SAMPLE_DATA).samples, 0.25, seed=0)
    assert len(trained_on) == 12 and not {s.image for s in held} & set(trained_on)
