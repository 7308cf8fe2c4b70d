"""Optimizers: each one optimizes, takes its arguments, resumes exactly with each schedule, and
refuses clearly where it cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_lora.choices import OptimizerError, parse_optimizer_args
from sd_lora.config import ConfigError, TrainConfig, load_config
from sd_lora.train.optimizers import build_optimizer
from sd_lora.train.recipe import train
from tests.lora_helpers import killed_then_resumed

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"
LEARNING_RATES = {"adamw": 0.05, "prodigy": 1.0, "adafactor": 0.05}


@pytest.mark.parametrize("name", ["adamw", "prodigy", "adafactor"])
def test_each_optimizer_solves_a_least_squares_problem(name):
    """Fit x in A x = b (b = A x_true, so the minimum is 0): the loss must fall to under a
    fifth in 100 steps."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 8, generator=g)
    b = a @ torch.randn(8, generator=g)
    x = torch.nn.Parameter(torch.zeros(8))
    optimizer = build_optimizer([{"params": [x], "lr": LEARNING_RATES[name]}],
                                TrainConfig(optimizer=name, adam_weight_decay=0.0))
    first = None
    for _ in range(100):
        loss = ((a @ x - b) ** 2).mean()
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(((a @ x.detach() - b) ** 2).mean()) < 0.2 * first


def test_optimizer_args_reach_the_optimizer_and_unknown_ones_are_named():
    from prodigyopt import Prodigy
    from transformers.optimization import Adafactor

    x = torch.nn.Parameter(torch.zeros(2))
    prodigy = build_optimizer([{"params": [x], "lr": 1.0}], TrainConfig(
        optimizer="prodigy", optimizer_args=("d_coef=2", "use_bias_correction=true")))
    assert isinstance(prodigy, Prodigy)
    assert prodigy.param_groups[0]["d_coef"] == 2 and prodigy.param_groups[0]["use_bias_correction"]
    adafactor = build_optimizer([{"params": [x], "lr": 1e-3}], TrainConfig(optimizer="adafactor"))
    assert isinstance(adafactor, Adafactor) and not adafactor.param_groups[0]["relative_step"]
    with pytest.raises(OptimizerError, match="AdamW takes no d_coef; it takes .*betas"):
        build_optimizer([{"params": [x], "lr": 1e-3}], TrainConfig(optimizer_args=("d_coef=2",)))
    assert parse_optimizer_args(["a=1", "b=0.5", "c=true", "d=cosine", "e=(0.9, 0.99)"]) == {
        "a": 1, "b": 0.5, "c": True, "d": "cosine", "e": (0.9, 0.99)}
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ['train.optimizer_args=["d_coef"]'])


def test_learning_rates_are_checked_for_the_chosen_optimizer():
    load_config(None, ['train.optimizer="prodigy"', "train.learning_rate=1.0",
                       "train.text_encoder_learning_rate=1.0"])
    with pytest.raises(ConfigError, match="between 0 and 1 for train.optimizer = 'adamw'"):
        load_config(None, ["train.learning_rate=1.0"])


def test_adamw8bit_without_a_gpu_is_refused_before_any_model_loads(tmp_path):
    config = load_config(None, ['model.base="tiny"', f'data.path="{SAMPLE_DATA}"',
                                f'train.output_dir="{tmp_path}"', 'train.optimizer="adamw8bit"'])
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: adamw8bit may run here")
    with pytest.raises(OptimizerError, match="adamw8bit.*(bitsandbytes|CUDA)"):
        train(config, show_progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("name, schedule", [
    ("adamw", "cosine_with_restarts"), ("adamw", "polynomial"), ("prodigy", "cosine"),
    ("adafactor", "linear"),
])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, monkeypatch, name, schedule):
    lr = LEARNING_RATES[name] / 10 if name != "prodigy" else 1.0

    def job(out):
        return load_config(None, [
            'model.base="tiny"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{out}"',
            "train.name=o", "train.max_steps=6", "train.batch_size=2", "train.checkpoint_every=0",
            "sample.every=0", "sample.steps=2", "report.enabled=false", 'export.dtype="fp32"',
            f'train.optimizer="{name}"', f'train.lr_scheduler="{schedule}"', "train.lr_warmup_steps=2",
            "train.lr_scheduler_num_cycles=2", f"train.learning_rate={lr}",
            f"train.text_encoder_learning_rate={lr}",
        ])

    straight = load_file(train(job(tmp_path / "straight"), show_progress=False).adapter_files["kohya"])
    resumed = load_file(killed_then_resumed(job(tmp_path / "resumed"), monkeypatch)
                        .adapter_files["kohya"])
    assert straight.keys() == resumed.keys()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "resumed" / "o.safetensors"), "pt") as f:
        assert f.metadata()["ss_optimizer"].split(".")[-1].lower().startswith(name.replace("w8bit", "w"))
    moved = max(float(straight[k].abs().max()) for k in straight if k.endswith("lora_up.weight"))
    assert moved > 0  # lora_up starts at zero: the optimizer changed it
    assert max(float((straight[k] - resumed[k]).abs().max()) for k in straight) <= 1e-6
