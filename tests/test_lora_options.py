"""LoRA+ learning rates and rank/alpha patterns: their effect on the optimizer and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from sd_lora.config import ConfigError, load_config
from sd_lora.errors import UserError
from sd_lora.models.builtin.tiny import build_tiny_pipeline
from sd_lora.train.recipe import add_adapters, make_optimizer, train

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"


def test_loraplus_gives_the_up_projections_their_own_faster_groups():
    config = load_config(None, ["train.loraplus_lr_ratio=16", "train.learning_rate=1e-4",
                                "train.text_encoder_learning_rate=5e-5"])
    pipe = build_tiny_pipeline()
    trained = add_adapters(pipe, config.lora)
    optimizer = make_optimizer(trained, config.train)
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == [1e-4, 1e-4 * 16, 5e-5, 5e-5 * 16]
    names = {id(p): n for m in trained.values() for n, p in m.named_parameters()}
    for group in optimizer.param_groups:
        ups = {".lora_B." in names[id(p)] for p in group["params"]}
        assert ups == ({True} if group["lr"] in (1.6e-3, 8e-4) else {False})
    plain = make_optimizer(trained, load_config(None, []).train)
    assert len(plain.param_groups) == 2


@pytest.mark.slow
def test_rank_and_alpha_patterns_reach_the_exported_file(tmp_path):
    config = load_config(None, [
        'model.base="tiny"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{tmp_path}"',
        "train.name=p", "train.max_steps=1", "train.batch_size=2", "train.checkpoint_every=0",
        "sample.every=0", "sample.steps=2", "report.enabled=false",
        'lora.rank_pattern=["up_blocks.1.*=2", "q_proj=1"]', 'lora.alpha_pattern=["attn2.to_k=3"]',
        "train.loraplus_lr_ratio=4",
    ])
    result = train(config, show_progress=False)
    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:
        ranks = {k.split(".")[0]: f.get_slice(k).get_shape()[0] for k in f.keys()
                 if k.endswith("lora_down.weight")}
        alphas = {k.split(".")[0]: float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
        metadata = f.metadata()
    for name, rank in ranks.items():
        if "up_blocks_1_" in name:
            assert rank == 2, name
        elif name.endswith("q_proj"):
            assert rank == 1, name
        else:
            assert rank == (8 if name.startswith("lora_unet") else 4), name
    assert all(a == 3.0 for n, a in alphas.items() if n.endswith("attn2_to_k"))
    assert alphas["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == 8.0
    assert '"loraplus_lr_ratio": "4.0"' in metadata["ss_network_args"]


def test_patterns_that_match_nothing_or_do_not_parse_are_errors():
    pipe = build_tiny_pipeline()
    config = load_config(None, ['lora.rank_pattern=["down_blocks.9.*=2"]'])
    with pytest.raises(UserError, match="lora.rank_pattern: 'down_blocks.9.\\*' matches none"):
        add_adapters(pipe, config.lora)
    with pytest.raises(ConfigError, match="lora.alpha_pattern entry 'to_k'"):
        load_config(None, ['lora.alpha_pattern=["to_k"]'])
    with pytest.raises(ConfigError, match="positive"):
        load_config(None, ['lora.rank_pattern=["to_k=0"]'])


@pytest.mark.slow
def test_a_locon_run_exports_conv_modules_in_kohya_layout(tmp_path):
    config = load_config(None, [
        'model.base="tiny"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{tmp_path}"',
        "train.name=c", "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=0",
        "sample.every=0", "sample.steps=2", "report.enabled=false",
        'lora.unet_targets=["attn", "conv"]', "lora.conv_r=3", "lora.conv_alpha=1.5",
    ])
    result = train(config, show_progress=False)
    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:
        down = f.get_slice("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight").get_shape()
        up = f.get_slice("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight").get_shape()
        alpha = float(f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.alpha"))
        shortcut = f.get_slice("lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight").get_shape()
        metadata = f.metadata()
    assert (down, up, alpha) == ([3, 32, 3, 3], [32, 3, 1, 1], 1.5)  # kohya's LoCon layout
    assert shortcut[0] == 8  # the Linear time projection takes unet_r
    assert '"conv_dim": "3"' in metadata["ss_network_args"]


def test_lora_dropout_acts_in_training_only():
    import torch

    from tests.lora_helpers import fill_lora_B

    def two_passes(dropout: float, training: bool):
        pipe = build_tiny_pipeline()
        config = load_config(None, [f"lora.dropout={dropout}"])
        trained = add_adapters(pipe, config.lora)
        fill_lora_B(trained.values(), seed=1, scale=0.5)
        pipe.unet.train(training)
        latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
        with torch.no_grad():
            return [pipe.unet(latents, 10, context).sample for _ in range(2)]

    a, b = two_passes(0.5, training=True)
    assert float((a - b).abs().max()) > 1e-4  # a new dropout mask each pass
    a, b = two_passes(0.5, training=False)
    assert torch.equal(a, b)
    a, b = two_passes(0.0, training=True)
    assert torch.equal(a, b)
