"""sd-scripts' adapter dropouts (network, rank, module): what each drops, measured on a layer
whose delta can be read back exactly; training-only; recorded in the file; resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from sd_lora.config import ConfigError, load_config
from sd_lora.lora.dropouts import AdapterDropouts, add_dropouts
from sd_lora.lora.inject import ADAPTER_NAME

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"
WIDTH = 16  # features of the probe layer, and its rank: lora_A = lora_B = identity


def identity_lora(conv: bool = False) -> torch.nn.Module:
    """A layer whose delta is exactly its input (base weight 0, A = B = I, alpha = r), so the
    delta divided by the input is the dropout mask times its rescaling."""
    layer = torch.nn.Conv2d(WIDTH, WIDTH, 1, bias=False) if conv else \
        torch.nn.Linear(WIDTH, WIDTH, bias=False)
    model = torch.nn.Sequential()
    model.add_module("layer", layer)
    inject_adapter_in_model(LoraConfig(r=WIDTH, lora_alpha=WIDTH, target_modules=["layer"]),
                            model, adapter_name=ADAPTER_NAME)
    lora = model.layer
    with torch.no_grad():
        lora.base_layer.weight.zero_()
        eye = torch.eye(WIDTH)
        lora.lora_A[ADAPTER_NAME].weight.copy_(eye.view_as(lora.lora_A[ADAPTER_NAME].weight))
        lora.lora_B[ADAPTER_NAME].weight.copy_(eye.view_as(lora.lora_B[ADAPTER_NAME].weight))
    return model


def levels(mask: torch.Tensor) -> list[float]:
    return sorted({round(v, 4) for v in mask.flatten().tolist()})


def kept(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x) / x


def test_rank_dropout_drops_whole_rank_dimensions_per_sample_and_rescales():
    torch.manual_seed(0)
    model = identity_lora()
    assert add_dropouts({"m": model}, AdapterDropouts(rank=0.25)) == 1
    model.train()
    mask = kept(model, torch.rand(400, 7, WIDTH) + 0.5)  # (samples, tokens, rank)
    # Dropped, or kept and scaled by 1 / (1 - p):
    assert levels(mask) == pytest.approx([0.0, 1 / 0.75], abs=1e-4)
    assert torch.equal(mask > 0, (mask[:, :1] > 0).expand_as(mask))  # the same dims at every token
    dropped = float((mask == 0).float().mean())
    assert dropped == pytest.approx(0.25, abs=0.02)  # 6400 draws: 4 sigma is 0.022
    assert len({tuple(row) for row in (mask[:, 0] > 0).tolist()}) > 100  # samples differ
    model.eval()
    assert torch.allclose(kept(model, torch.rand(4, 7, WIDTH) + 0.5), torch.ones(4, 7, WIDTH))


def test_rank_dropout_on_a_convolution_is_per_sample_and_channel():
    torch.manual_seed(1)
    model = identity_lora(conv=True)
    add_dropouts({"m": model}, AdapterDropouts(rank=0.5))
    model.train()
    mask = kept(model, torch.rand(200, WIDTH, 3, 3) + 0.5)  # (samples, rank, h, w)
    assert torch.equal(mask > 0, (mask[:, :, :1, :1] > 0).expand_as(mask))  # per sample and channel
    assert float((mask == 0).float().mean()) == pytest.approx(0.5, abs=0.03)
    assert float(mask.max()) == pytest.approx(2.0)


def test_network_dropout_is_element_wise():
    torch.manual_seed(2)
    model = identity_lora()
    add_dropouts({"m": model}, AdapterDropouts(network=0.3))
    model.train()
    mask = kept(model, torch.rand(100, 7, WIDTH) + 0.5)
    assert levels(mask) == pytest.approx([0.0, 1 / 0.7], abs=1e-4)
    assert not torch.equal(mask > 0, (mask[:, :1] > 0).expand_as(mask))  # tokens differ (not rank)
    assert float((mask == 0).float().mean()) == pytest.approx(0.3, abs=0.02)


def test_module_dropout_leaves_out_the_whole_delta_on_some_steps():
    torch.manual_seed(3)
    model = identity_lora()
    add_dropouts({"m": model}, AdapterDropouts(module=0.4))
    model.train()
    x = torch.rand(2, 5, WIDTH) + 0.5
    passes = [kept(model, x) for _ in range(500)]
    whole = sum(torch.allclose(m, torch.ones_like(m)) for m in passes)
    none = sum(torch.equal(m, torch.zeros_like(m)) for m in passes)
    assert whole + none == 500  # all of the delta (not rescaled) or none of it
    assert none / 500 == pytest.approx(0.4, abs=0.09)  # 4 sigma
    model.eval()
    assert all(torch.allclose(kept(model, x), torch.ones_like(x)) for _ in range(20))


def test_dropout_settings_are_checked():
    with pytest.raises(ConfigError, match="lora.rank_dropout = 1.0 must be in"):
        load_config(None, ["lora.rank_dropout=1.0"])
    with pytest.raises(ConfigError, match="lora.use_dora"):
        load_config(None, ["lora.module_dropout=0.1", "lora.use_dora=true"])


@pytest.mark.slow
def test_a_run_with_the_dropouts_differs_resumes_exactly_and_records_them(tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from sd_lora.train.recipe import train
    from tests.lora_helpers import killed_then_resumed

    def job(out, *dropouts):
        return load_config(None, [
            'model.base="tiny"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{out}"',
            "train.name=d", "train.max_steps=6", "train.batch_size=2", "train.checkpoint_every=0",
            "sample.every=0", "sample.steps=2", "report.enabled=false", 'export.dtype="fp32"',
            "train.learning_rate=1e-3", 'lora.unet_targets=["attn", "conv"]', *dropouts,
        ])

    dropouts = ("lora.network_dropout=0.1", "lora.rank_dropout=0.2", "lora.module_dropout=0.2")
    straight = train(job(tmp_path / "a", *dropouts), show_progress=False)
    plain = train(job(tmp_path / "p"), show_progress=False)
    resumed = killed_then_resumed(job(tmp_path / "b", *dropouts), monkeypatch)
    a, b = load_file(straight.adapter_files["kohya"]), load_file(resumed.adapter_files["kohya"])
    c = load_file(plain.adapter_files["kohya"])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6  # the same draws again
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4  # and they changed the run
    with safe_open(str(resumed.adapter_files["kohya"]), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dropout"] == "0.1"
    assert '"rank_dropout": "0.2"' in metadata["ss_network_args"]
    assert '"module_dropout": "0.2"' in metadata["ss_network_args"]
