"""EMA of the adapter weights: the average follows its formula, training itself is unchanged,
and a resumed run continues the same average."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_lora.config import ConfigError, load_config
from sd_lora.train.ema import AdapterEMA
from sd_lora.train.recipe import train
from tests.lora_helpers import killed_then_resumed

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"


def test_the_average_follows_its_warmed_up_decay():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA({"w": p}, decay=0.9)
    shadow = torch.zeros(3)
    for n in range(1, 6):
        with torch.no_grad():
            p.add_(1.0)
        ema.update()
        d = 0.0 if n == 1 else min(0.9, n / (9 + n))  # diffusers' EMAModel: the first copies
        shadow = d * shadow + (1 - d) * p.detach()
    torch.testing.assert_close(ema.tensors()["ema::w"], shadow)
    ema.apply()
    torch.testing.assert_close(p.detach(), shadow)
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config(None, ["train.ema_decay=1.5"])


def job(out, *extra):
    return load_config(None, [
        'model.base="tiny"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{out}"',
        "train.name=e", "train.max_steps=6", "train.batch_size=2", "train.checkpoint_every=0",
        "sample.every=0", "sample.steps=2", "report.enabled=false", 'export.dtype="fp32"',
        "train.learning_rate=1e-2", *extra,
    ])


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_ema_exports_the_average_beside_the_unchanged_raw_weights(tmp_path, monkeypatch):
    plain = load_file(train(job(tmp_path / "plain"), show_progress=False).adapter_files["kohya"])
    with_ema = train(job(tmp_path / "ema", "train.ema_decay=0.9"), show_progress=False)
    averaged = load_file(with_ema.adapter_files["kohya"])
    raw = load_file(tmp_path / "ema" / "e-raw.safetensors")
    assert max_diff(raw, plain) == 0.0  # the average never feeds back into training
    assert max_diff(averaged, raw) > 1e-4
    resumed = killed_then_resumed(job(tmp_path / "resumed", "train.ema_decay=0.9"), monkeypatch)
    assert max_diff(load_file(resumed.adapter_files["kohya"]), averaged) <= 1e-6


def test_swapping_the_average_in_restores_the_raw_weights():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA({"w": p}, decay=0.5)
    for _ in range(3):
        with torch.no_grad():
            p.add_(1.0)
        ema.update()
    raw = p.detach().clone()
    with ema.swapped_in():
        torch.testing.assert_close(p.detach(), ema.tensors()["ema::w"])
        assert not torch.equal(p.detach(), raw)
    assert torch.equal(p.detach(), raw)


@pytest.mark.slow
def test_validation_measures_and_keeps_the_average(tmp_path):
    """With EMA the export is the average, so the best adapter must be one too: validated only
    at the last step, `-best` is exactly the exported average, not the raw weights."""
    run = train(job(tmp_path, "train.ema_decay=0.9", "data.validation_split=0.25",
                    "train.validation_every=0"), show_progress=False)
    best = load_file(tmp_path / "e-best.safetensors")
    assert max_diff(best, load_file(run.adapter_files["kohya"])) == 0.0
    assert max_diff(best, load_file(tmp_path / "e-raw.safetensors")) > 1e-4
