"""Target selection (table-driven) and the round trip of every target group through export."""

from __future__ import annotations

import pytest
import torch

from sd_lora.adapters.apply import apply_adapters
from sd_lora.adapters.files import load_adapter, pipeline_module_paths, save_adapter
from sd_lora.lora.inject import add_lora, read_adapter_state, target_suffixes
from sd_lora.models.load import load_pipeline
from tests.lora_helpers import fill_lora_B

# tiny UNet: 16 transformer blocks (2 attentions x 8 cross-attention blocks), each with attn1 and
# attn2; tiny CLIP: 2 layers.
EXPECTED_COUNTS = [
    ("unet", ("attn",), 16 * 2 * 4),
    ("unet", ("proj",), 16 * 2),  # Conv2d 1x1 in SD 1.x
    ("unet", ("ff",), 16 * 2),
    ("unet", ("attn", "proj", "ff"), 16 * 2 * 4 + 16 * 2 + 16 * 2),
    ("text_encoder", ("attn",), 2 * 4),
    ("text_encoder", ("mlp",), 2 * 2),
]


@pytest.mark.parametrize("component, groups, count", EXPECTED_COUNTS)
def test_target_groups_select_the_expected_layers(tiny_pipe, component, groups, count):
    names = add_lora(getattr(tiny_pipe, component), component, groups, r=2, alpha=2)
    assert len(names) == count
    trainable = {n for n, p in getattr(tiny_pipe, component).named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)


def test_unknown_target_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"unknown LoRA target 'attention'; supported: \['attn', 'conv', 'ff', 'proj'\]"):
        target_suffixes("unet", ("attention",))
    with pytest.raises(ValueError, match="choose at least one target group"):
        target_suffixes("text_encoder", ())


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_every_group_survives_export_and_loads_everywhere(tiny_pipe, tmp_path, fmt):
    """Every target group, LoCon's ResNet convolutions included (3x3 at rank 2, alpha 1)."""
    names = add_lora(tiny_pipe.unet, "unet", ("attn", "proj", "ff", "conv"), r=4, alpha=8,
                     conv_r=2, conv_alpha=1.0)
    assert "down_blocks.0.resnets.0.conv1" in names and "up_blocks.0.upsamplers.0.conv" in names
    conv1 = tiny_pipe.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    assert conv1.lora_A["default"].weight.shape[:2] == (2, 32) and conv1.scaling["default"] == 0.5
    add_lora(tiny_pipe.text_encoder, "text_encoder", ("attn", "mlp"), r=4, alpha=2)
    fill_lora_B((tiny_pipe.unet, tiny_pipe.text_encoder))
    state = read_adapter_state({"unet": tiny_pipe.unet, "text_encoder": tiny_pipe.text_encoder}, "sd1")
    path = save_adapter(state, tmp_path / f"{fmt}.safetensors", format=fmt, dtype=torch.float32)
    ids = tiny_pipe.tokenizer(["a red circle"], padding="max_length", max_length=77,
                              return_tensors="pt").input_ids
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500])

    def outputs(pipe):
        with torch.no_grad():
            text = pipe.text_encoder(ids)[0]
            return text, pipe.unet(latents, t, text).sample

    want = outputs(tiny_pipe)
    theirs = load_pipeline("tiny")
    theirs.load_lora_weights(str(path))
    ours = load_pipeline("tiny")
    apply_adapters(ours, [(load_adapter(path, pipeline_module_paths(ours)), 1.0, 1.0)])
    for got in (outputs(theirs), outputs(ours)):
        assert (got[0] - want[0]).abs().max() < 1e-5
        assert (got[1] - want[1]).abs().max() < 1e-5


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_input_casting_off_under_autocast_changes_nothing(dora):
    """uncast_inputs (a training step's memory saver): the same outputs and gradients, bit for
    bit, under bf16 autocast; DoRA layers keep PEFT's cast (their result would change)."""
    from peft.tuners.lora import LoraLayer

    from sd_lora.config import load_config
    from sd_lora.lora.inject import uncast_inputs
    from sd_lora.models.load import load_pipeline
    from sd_lora.train.recipe import add_adapters

    pipe = load_pipeline("tiny", dtype=torch.bfloat16)
    config = load_config(None, [f"lora.use_dora={str(dora).lower()}",
                                'lora.unet_targets=["attn", "conv"]'])
    torch.manual_seed(0)
    trained = add_adapters(pipe, config.lora)
    unet = pipe.unet
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    text = torch.randn(2, 77, 32, generator=g).bfloat16()
    results = []
    for active in (False, True):
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), uncast_inputs(trained.values(), active):
            flags = {getattr(m, "cast_input_dtype_enabled", True)
                     for m in unet.modules() if isinstance(m, LoraLayer)}
            out = unet(latents, torch.tensor([10, 500]), text).sample
        out.float().pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()
                                       if p.grad is not None}, flags))
    (out_a, grads_a, _), (out_b, grads_b, flags_on) = results
    assert flags_on == ({True} if dora else {False})
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert all(getattr(m, "cast_input_dtype_enabled", True)  # put back after the step
               for m in unet.modules() if isinstance(m, LoraLayer))
