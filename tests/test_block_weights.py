"""LoRA Block Weight: parsing, the diffusers -> LBW block table, and the merged deltas."""

from __future__ import annotations

import pytest
import torch

from sd_lora.adapters.apply import apply_adapters, restore
from sd_lora.adapters.block_weights import (
    ALL_BLOCK_NAMES,
    BLOCK_NAMES,
    OTHER,
    PRESETS,
    BlockWeightError,
    block_of,
    format_block_weights,
    parse_block_weights,
)
from sd_lora.adapters.files import component_modules
from sd_lora.adapters.use import AdapterUse
from sd_lora.errors import UserError
from tests.test_apply import make_state

IN04_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
IN01_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
MID_V = "mid_block.attentions.0.transformer_blocks.0.attn1.to_v"
OUT11_OUT = "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0"
IN03_CONV = "down_blocks.0.downsamplers.0.conv"  # a block only the 26-weight form names
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize(
    "component, path, block",
    [
        ("text_encoder", TE_Q, "BASE"),
        ("unet", "conv_in", "IN00"),
        ("unet", IN01_K, "IN01"),
        ("unet", "down_blocks.0.resnets.1.conv1", "IN02"),
        ("unet", IN03_CONV, "IN03"),
        ("unet", IN04_Q, "IN04"),
        ("unet", "down_blocks.2.attentions.1.proj_in", "IN08"),
        ("unet", "down_blocks.3.resnets.1.conv2", "IN11"),
        ("unet", MID_V, "MID"),
        ("unet", "up_blocks.0.resnets.2.conv1", "OUT02"),
        ("unet", "up_blocks.0.upsamplers.0.conv", "OUT02"),
        ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", "OUT03"),
        ("unet", "up_blocks.1.upsamplers.0.conv", "OUT05"),
        ("unet", OUT11_OUT, "OUT11"),
        ("unet", "time_embedding.linear_1", OTHER),
        ("unet", "conv_out", OTHER),
    ],
)
def test_block_of_maps_diffusers_names_to_ldm_blocks(component, path, block):
    assert block_of(component, path) == block


def test_every_attention_layer_of_an_sd_unet_is_in_one_of_the_17_blocks(tiny_pipe):
    unet_layers = component_modules(tiny_pipe)["unet"]
    blocks = {block_of("unet", p) for p in unet_layers if ".attentions." in p or "mid_block" in p}
    assert blocks == set(BLOCK_NAMES) - {"BASE"}


def test_parse_presets_and_numbers():
    assert len(PRESETS) >= 10 and all(len(v) == 17 for v in PRESETS.values())
    assert parse_block_weights("INS") == PRESETS["INS"]
    assert parse_block_weights(" outall ") == PRESETS["OUTALL"]
    assert PRESETS["MIDD"] == (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0)
    numbers = "1, 0.5,0,0,0,0,0,0,0,0,0,0,0,0,0,0,-1"
    assert parse_block_weights(numbers) == (1, 0.5) + (0,) * 14 + (-1,)
    assert len(parse_block_weights(",".join(["1"] * 26))) == len(ALL_BLOCK_NAMES)
    assert format_block_weights(PRESETS["IND"]) == "IND"
    assert format_block_weights(parse_block_weights(numbers)) == "1,0.5" + ",0" * 14 + ",-1"


@pytest.mark.parametrize(
    "text, named",
    [
        ("", "empty"),
        ("SOMETIMES", "'SOMETIMES'"),
        ("1,1,1", "3 values"),
        ("1,1,1,x,1,1,1,1,1,1,1,1,1,1,1,1,1", "IN04 = 'x'"),
        ("1,1,1,1,1,1,1,nan,1,1,1,1,1,1,1,1,1", "MID = 'nan'"),
    ],
)
def test_parse_errors_name_the_bad_token(text, named):
    with pytest.raises(BlockWeightError, match=named) as info:
        parse_block_weights(text)
    assert isinstance(info.value, UserError)


def test_block_weight_scales_each_module_delta_and_zero_leaves_the_base(tiny_pipe):
    paths = {"unet": [IN04_Q, IN01_K, MID_V, OUT11_OUT, IN03_CONV], "text_encoder": [TE_Q]}
    state = make_state(tiny_pipe, paths, seed=3, alpha=2.0)
    layers = component_modules(tiny_pipe)
    before = {(c, p): layers[c][p].weight.detach().clone() for c, ps in paths.items() for p in ps}
    #          BASE IN01 IN02 IN04 IN05 IN07 IN08 MID  OUT03 ... OUT11
    weights = (0.5, 0.0, 1.0, 0.25, 1.0, 1.0, 1.0, -1.0) + (1.0,) * 8 + (2.0,)
    applied = apply_adapters(tiny_pipe, [AdapterUse(state, 0.8, 0.6, weights, "a")])
    expected_factor = {
        ("unet", IN04_Q): 0.8 * 0.25,
        ("unet", IN01_K): 0.0,
        ("unet", MID_V): 0.8 * -1.0,
        ("unet", OUT11_OUT): 0.8 * 2.0,
        ("unet", IN03_CONV): 0.0,  # 17 weights: the extension gives IN03 zero
        ("text_encoder", TE_Q): 0.6 * 0.5,
    }
    for (component, path), factor in expected_factor.items():
        after = layers[component][path].weight
        w0 = before[(component, path)]
        if factor == 0.0:
            assert torch.equal(after, w0), path  # exactly the base, not merely close
        else:
            delta = state.modules[component][path].delta(1.0)
            torch.testing.assert_close(after - w0, factor * delta, rtol=1e-5, atol=1e-6)
    restore(tiny_pipe, applied)
    assert all(torch.equal(layers[c][p].weight, w) for (c, p), w in before.items())


def test_all_ones_equals_no_block_weights_bit_for_bit(tiny_pipe):
    state = make_state(tiny_pipe, {"unet": [IN04_Q, MID_V], "text_encoder": [TE_Q]}, seed=4)
    layers = component_modules(tiny_pipe)
    applied = apply_adapters(tiny_pipe, [AdapterUse(state, 0.7, 0.7)])
    plain = {p: layers["unet"][p].weight.detach().clone() for p in (IN04_Q, MID_V)}
    apply_adapters(tiny_pipe, [AdapterUse(state, 0.7, 0.7, PRESETS["ALL"])], replace=applied)
    assert all(torch.equal(layers["unet"][p].weight, w) for p, w in plain.items())


def test_26_weights_reach_the_convolution_only_blocks(tiny_pipe):
    state = make_state(tiny_pipe, {"unet": [IN03_CONV]}, seed=5)
    layers = component_modules(tiny_pipe)
    w0 = layers["unet"][IN03_CONV].weight.detach().clone()
    weights = [0.0] * 26
    weights[ALL_BLOCK_NAMES.index("IN03")] = 0.5
    apply_adapters(tiny_pipe, [AdapterUse(state, 1.0, 1.0, tuple(weights))])
    delta = state.modules["unet"][IN03_CONV].delta(0.5)
    torch.testing.assert_close(layers["unet"][IN03_CONV].weight - w0, delta, rtol=1e-5, atol=1e-6)


def test_modules_outside_every_block_keep_weight_one_as_in_the_extension(tiny_pipe):
    state = make_state(tiny_pipe, {"unet": ["time_embedding.linear_1", IN04_Q]}, seed=6)
    layers = component_modules(tiny_pipe)
    before = {p: layers["unet"][p].weight.detach().clone() for p in state.modules["unet"]}
    apply_adapters(tiny_pipe, [AdapterUse(state, 1.0, 1.0, PRESETS["NONE"], "x")])
    assert torch.equal(layers["unet"][IN04_Q].weight, before[IN04_Q])
    delta = state.modules["unet"]["time_embedding.linear_1"].delta(1.0)
    changed = layers["unet"]["time_embedding.linear_1"].weight - before["time_embedding.linear_1"]
    torch.testing.assert_close(changed, delta, rtol=1e-5, atol=1e-6)


def test_a_path_in_no_block_is_an_error_naming_it():
    with pytest.raises(BlockWeightError, match="'some_block.attn.to_q' is in no SD 1.x/2.x UNet"):
        block_of("unet", "some_block.attn.to_q")

