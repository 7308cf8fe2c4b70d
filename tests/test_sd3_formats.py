"""SD3 / SD3.5 in the kohya layout: original MMDiT names, q/k/v fusion, and the proof against
diffusers' own converter (`convert_sd3_transformer_checkpoint_to_diffusers`)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_sd3_transformer_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)

from sd_lora.choices import TRANSFORMER_TARGET_GROUPS
from sd_lora.formats import mmdit, sd3_checkpoint
from sd_lora.formats.adapter_state import AdapterState, LohaModule, LoraModule
from sd_lora.formats.kohya import (
    KohyaKeyError,
    from_kohya,
    kohya_module_name,
    lookup_table,
    module_tensors,
    to_kohya,
)
from sd_lora.formats.sd3_checkpoint import transformer_to_original
from sd_lora.models.single_file import bundled_folder

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
            pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
            dual_attention_layers=(0,), qk_norm="rms_norm")
TARGETS = tuple(s for group in TRANSFORMER_TARGET_GROUPS.values() for s in group)
TE_PATHS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.mlp.fc1"]


def lora(out_f: int, in_f: int, r: int, alpha: float, gen, kernel: tuple = ()) -> LoraModule:
    return LoraModule(torch.randn(r, in_f, *kernel, generator=gen),
                      torch.randn(out_f, r, *[1] * len(kernel), generator=gen), alpha)


def layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return SD3Transformer2DModel(**TINY)


def sd3_state(model, seed: int = 0, alphas=(4.0,)) -> AdapterState:
    """A LoRA on every targeted layer plus the embedders and final layer; alphas cycle."""
    gen = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}
    for i, (path, layer) in enumerate(layers(model).items()):
        kernel = tuple(layer.weight.shape[2:])
        modules[path] = lora(layer.weight.shape[0], layer.weight.shape[1], 4,
                             alphas[i % len(alphas)], gen, kernel)
    te = {p: lora(8, 8, 2, 1.0, gen) for p in TE_PATHS}
    return AdapterState("sd3", {"transformer": modules, "text_encoder": te, "text_encoder_2": dict(te)})


def paths_of(model) -> dict[str, list[str]]:
    return {"transformer": list(layers(model)), "text_encoder": TE_PATHS, "text_encoder_2": TE_PATHS}


# --- fuse / split -----------------------------------------------------------------------------


def test_fuse_is_the_three_deltas_stacked_and_split_gives_them_back():
    gen = torch.Generator().manual_seed(1)
    q, k, v = lora(6, 5, 4, 4.0, gen), lora(6, 5, 4, 8.0, gen), lora(6, 5, 2, 0.5, gen)
    fused = mmdit.fuse_qkv(q, k, v)
    assert fused.lora_A.shape == (10, 5) and fused.lora_B.shape == (18, 10)
    stacked = torch.cat([q.delta(), k.delta(), v.delta()])
    torch.testing.assert_close(fused.delta(), stacked)
    for back, part in zip(mmdit.split_qkv(fused), (q, k, v)):  # rank 10: the shared-down split
        torch.testing.assert_close(back.delta(), part.delta())


def test_equal_alphas_round_trip_tensor_exactly():
    gen = torch.Generator().manual_seed(2)
    parts = [lora(6, 5, 3, 0.5, gen) for _ in range(3)]
    fused = mmdit.fuse_qkv(*parts)
    assert fused.alpha == 1.5 and fused.scale == parts[0].scale
    for back, part in zip(mmdit.split_qkv(fused), parts):
        assert back.r == 3 and back.alpha == part.alpha
        assert torch.equal(back.lora_A, part.lora_A) and torch.equal(back.lora_B, part.lora_B)


@pytest.mark.parametrize("rank", [5, 6])  # 6: divisible by 3 but not block diagonal
def test_shared_down_fused_lora_splits_exactly(rank):
    """What sd-scripts trains without split_qkv: one down for the whole qkv layer."""
    gen = torch.Generator().manual_seed(3)
    fused = lora(18, 5, rank, 3.0, gen)
    parts = mmdit.split_qkv(fused)
    for i, part in enumerate(parts):
        assert torch.equal(part.lora_A, fused.lora_A) and part.alpha == 3.0
        torch.testing.assert_close(part.delta(), fused.delta()[i * 6:(i + 1) * 6])
    assert parts[0].lora_A.data_ptr() != parts[1].lora_A.data_ptr()  # savable: no shared storage


def test_untrained_fused_lora_splits_into_zero_blocks():
    fused = LoraModule(torch.ones(6, 5), torch.zeros(9, 6), 6.0)
    assert [p.r for p in mmdit.split_qkv(fused)] == [2, 2, 2]


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, original, part", [
    ("transformer_blocks.3.attn.to_k", "joint_blocks.3.x_block.attn.qkv", 1),
    ("transformer_blocks.3.attn.add_v_proj", "joint_blocks.3.context_block.attn.qkv", 2),
    ("transformer_blocks.0.attn2.to_q", "joint_blocks.0.x_block.attn2.qkv", 0),
    ("transformer_blocks.1.attn.to_add_out", "joint_blocks.1.context_block.attn.proj", None),
    ("transformer_blocks.1.norm1.linear", "joint_blocks.1.x_block.adaLN_modulation.1", None),
    ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2", None),
    ("pos_embed.proj", "x_embedder.proj", None),
])
def test_names_both_ways(path, original, part):
    assert mmdit.original_name(path) == (original, part)
    assert path in mmdit.diffusers_paths(original)
    assert mmdit.is_original(original) == (original != path)


def test_every_target_group_layer_has_an_original_name():
    for suffix in TARGETS:
        assert mmdit.original_name(f"transformer_blocks.7.{suffix}").path.startswith("joint_blocks.7.")


@pytest.mark.parametrize("call, arg", [
    (mmdit.original_name, "transformer_blocks.0.attn.to_out.1"),
    (mmdit.original_name, "proj_in"),
    (mmdit.diffusers_paths, "joint_blocks.0.x_block.attn.qkv_extra"),
])
def test_unmapped_paths_are_errors_naming_them(call, arg):
    with pytest.raises(mmdit.MmditKeyError, match=arg.replace(".", r"\.")):
        call(arg)
    assert issubclass(mmdit.MmditKeyError, ValueError)


# --- kohya ------------------------------------------------------------------------------------


def test_sd3_kohya_names_are_the_original_mmdit_ones(tiny):
    tensors = to_kohya(sd3_state(tiny))
    names = {k.split(".")[0] for k in tensors}
    for name in ("lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
                 "lora_unet_joint_blocks_1_context_block_attn_qkv", "lora_unet_final_layer_linear",
                 "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1"):
        assert name in names
    assert not any("to_q" in n or "transformer_blocks" in n for n in names)
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape == (12, 16)
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"].item() == 12.0


def test_sd3_kohya_round_trip(tiny):
    state = sd3_state(tiny)
    back = from_kohya(to_kohya(state, torch.float32), paths_of(tiny), "sd3")
    assert {c: set(m) for c, m in back.modules.items()} == {c: set(m) for c, m in state.modules.items()}
    for component, modules in state.modules.items():
        for path, m in modules.items():
            other = back.modules[component][path]
            assert other.alpha == m.alpha, path
            assert torch.equal(other.lora_A, m.lora_A) and torch.equal(other.lora_B, m.lora_B), path


def test_sd3_kohya_deltas_are_the_original_layers_deltas(tiny):
    """Per original layer, the file's delta is the diffusers deltas stacked (q, k, v) with the
    converter's row swap applied; differing alphas survive as equal deltas."""
    state = sd3_state(tiny, alphas=(4.0, 2.0, 1.0))
    tensors = to_kohya(state, torch.float32)
    modules = state.modules["transformer"]
    for original in {mmdit.original_name(p).path for p in modules}:
        name = kohya_module_name("lora_unet", original)
        written = LoraModule(tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"],
                             tensors[f"{name}.alpha"].item())
        paths = mmdit.diffusers_paths(original)
        expected = torch.cat([modules[p].delta() for p in paths])
        if mmdit.swaps_scale_shift(paths[0], *expected.shape[:2]):
            expected = mmdit.swap_scale_shift(expected)
        torch.testing.assert_close(written.delta(), expected)
    back = from_kohya(tensors, paths_of(tiny), "sd3")
    for path, m in modules.items():
        torch.testing.assert_close(back.modules["transformer"][path].delta(), m.delta())


def test_swapped_rows_are_the_last_blocks_context_norm_and_norm_out(tiny):
    swapped = {p for p, layer in layers(tiny).items()
               if mmdit.swaps_scale_shift(p, *layer.weight.shape[:2])}
    assert swapped == {"transformer_blocks.1.norm1_context.linear", "norm_out.linear"}


@pytest.mark.parametrize("prefix", ["lora_unet", "lora_transformer"])
def test_diffusers_named_sd3_files_are_read(tiny, prefix):
    state = sd3_state(tiny)
    tensors = {}
    for path, m in state.modules["transformer"].items():
        tensors.update(module_tensors(kohya_module_name(prefix, path), m, torch.float32))
    back = from_kohya(tensors, paths_of(tiny), "sd3")
    for path, m in state.modules["transformer"].items():  # diffusers row order: no swap
        assert torch.equal(back.modules["transformer"][path].lora_B, m.lora_B), path


def test_sd_scripts_shared_down_qkv_file_is_read(tiny):
    gen = torch.Generator().manual_seed(4)
    fused = lora(48, 16, 4, 2.0, gen)
    tensors = module_tensors("lora_unet_joint_blocks_0_context_block_attn_qkv", fused, torch.float32)
    back = from_kohya(tensors, paths_of(tiny), "sd3").modules["transformer"]
    parts = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
    stacked = torch.cat([back[f"transformer_blocks.0.{p}"].delta() for p in parts])
    torch.testing.assert_close(stacked, fused.delta())


def test_partial_qkv_is_refused_with_the_reason(tiny):
    state = sd3_state(tiny)
    del state.modules["transformer"]["transformer_blocks.0.attn.to_v"]
    with pytest.raises(KohyaKeyError, match=r"needs all three; missing \['transformer_blocks\.0\.attn\.to_v'\]"):
        to_kohya(state)


def test_unmapped_transformer_path_is_refused(tiny):
    state = AdapterState("sd3", {"transformer": {"proj_in": LoraModule(torch.ones(2, 4), torch.ones(4, 2), 2.0)}})
    with pytest.raises(KohyaKeyError, match="'proj_in' has no original MMDiT name"):
        to_kohya(state)


def test_fused_loha_is_refused_on_read(tiny):
    gen = torch.Generator().manual_seed(5)
    loha = LohaModule(*(torch.randn(s, generator=gen) for s in ((48, 2), (2, 16), (48, 2), (2, 16))), alpha=2.0)
    tensors = module_tensors("lora_unet_joint_blocks_0_x_block_attn_qkv", loha, torch.float32)
    with pytest.raises(KohyaKeyError, match="cannot be split into q, k and v exactly"):
        from_kohya(tensors, paths_of(tiny), "sd3")


def test_likely_cause_names_sd3_and_unet_files():
    sd3_file = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 8),
                "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(24, 2)}
    sd1_paths = {"unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]}
    with pytest.raises(KohyaKeyError, match="looks like an SD3 LoRA.*the base is SD 1.x"):
        from_kohya(sd3_file, sd1_paths, "sd1")
    unet_file = {k.replace("joint_blocks_0_x_block_attn_qkv", "input_blocks_4_1_transformer_blocks_0_attn1_to_q"): v
                 for k, v in sd3_file.items()}
    with pytest.raises(KohyaKeyError, match="looks like a UNet LoRA.*the base is SD 3.x"):
        from_kohya(unet_file, {"transformer": ["transformer_blocks.0.attn.to_q"]}, "sd3")


# --- proof against diffusers' converter ---------------------------------------------------------


def original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The library's diffusers -> original renaming (`sd3_checkpoint.transformer_to_original`,
    which single-file writing and the ComfyUI/sd-scripts checks use), without its file prefix:
    what diffusers' converter reads."""
    prefix = sd3_checkpoint.TRANSFORMER_PREFIX
    return {k.removeprefix(prefix): v for k, v in transformer_to_original(state_dict).items()}


def test_diffusers_converter_gives_back_the_tiny_model(tiny):
    state_dict = tiny.state_dict()
    checkpoint = original_state_dict(state_dict)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}, sorted(checkpoint)  # it read every name we wrote
    assert set(converted) == set(state_dict)
    for key, tensor in state_dict.items():
        assert torch.equal(converted[key], tensor), key


def full_size(name: str) -> SD3Transformer2DModel:
    config = json.loads((bundled_folder(name) / "transformer" / "config.json").read_text())
    with torch.device("meta"):  # shapes only, no memory
        return SD3Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})


@pytest.mark.parametrize("name, kind, blocks, dual", [
    ("stable-diffusion-3.5-medium", "sd35_medium", 24, 13),
    ("stable-diffusion-3.5-large", "sd35_large", 38, 0),
])
def test_full_size_sd35_layouts_match_the_converter(name, kind, blocks, dual):
    model = full_size(name)
    assert len(model.transformer_blocks) == blocks
    assert sum(b.attn2 is not None for b in model.transformer_blocks) == dual
    state_dict = model.state_dict()
    checkpoint = original_state_dict(state_dict)
    assert infer_diffusers_model_type(checkpoint) == kind  # diffusers knows the bundled config
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}, sorted(checkpoint)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in state_dict.items()}

    # Every original name we write holds exactly its diffusers layers, all in the model; one to
    # one except the three q/k/v of a fused qkv; the kohya names neither collide nor are ambiguous.
    paths = list(layers(model))
    originals: dict[str, list[str]] = {}
    for path in paths:
        originals.setdefault(mmdit.original_name(path).path, []).append(path)
    for original, held in originals.items():
        assert sorted(held) == sorted(mmdit.diffusers_paths(original)), original
        assert len(held) == (3 if original.endswith(".qkv") else 1)
    assert len({kohya_module_name("lora_unet", o) for o in originals}) == len(originals)
    table = lookup_table({"transformer": paths}, "sd3")
    assert {kohya_module_name("lora_unet", o) for o in originals} <= set(table)
