"""Kohya and diffusers layouts: names, alphas, round trips, aliases, and errors that name keys."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sd_lora.adapters.files import (
    AdapterFileError,
    load_adapter,
    pipeline_module_paths,
    reference_module_paths,
    save_adapter,
)
from sd_lora.formats.adapter_state import AdapterState, LoraModule
from sd_lora.formats.kohya import KohyaKeyError, from_kohya, parse_kohya_key, to_kohya
from sd_lora.formats.peft_diffusers import METADATA_KEY, from_diffusers, to_diffusers

UNET_R, UNET_ALPHA, TE_R, TE_ALPHA = 4, 8.0, 4, 2.0
Q0 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
OUT0 = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0"
TE_Q0 = "text_model.encoder.layers.0.self_attn.q_proj"


def random_state(pipe, family: str = "sd1", seed: int = 0) -> AdapterState:
    """Nonzero LoRA on every attention/MLP Linear of the tiny pipe (unet r4/a8, te r4/a2)."""
    gen = torch.Generator().manual_seed(seed)
    layers = {
        "unet": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2"),
        "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    }
    modules: dict[str, dict[str, LoraModule]] = {}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        r, alpha = (UNET_R, UNET_ALPHA) if component == "unet" else (TE_R, TE_ALPHA)
        for name, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear) and name.endswith(layers[component]):
                out_f, in_f = layer.weight.shape
                path = ("text_model." + name) if component == "text_encoder" else name
                modules.setdefault(component, {})[path] = LoraModule(
                    lora_A=torch.randn(r, in_f, generator=gen),
                    lora_B=torch.randn(out_f, r, generator=gen),
                    alpha=alpha,
                )
    return AdapterState(family=family, modules=modules)


@pytest.fixture
def state(tiny_pipe):
    return random_state(tiny_pipe)


def assert_same_state(a: AdapterState, b: AdapterState, exact: bool = True) -> None:
    assert a.family == b.family
    assert {c: set(m) for c, m in a.modules.items()} == {c: set(m) for c, m in b.modules.items()}
    for component, modules in a.modules.items():
        for path, m in modules.items():
            other = b.modules[component][path]
            assert other.alpha == m.alpha, (component, path)
            for x, y in ((m.lora_A, other.lora_A), (m.lora_B, other.lora_B)):
                if exact:
                    assert torch.equal(x, y), (component, path)
                else:
                    torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-3)


# --- kohya -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, key",
    [
        (Q0, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        (OUT0, "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0"),
        (
            "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        ),
    ],
)
def test_kohya_unet_names(state, path, key):
    tensors = to_kohya(state, torch.float32)
    assert torch.equal(tensors[f"{key}.lora_down.weight"], state.modules["unet"][path].lora_A)
    assert torch.equal(tensors[f"{key}.lora_up.weight"], state.modules["unet"][path].lora_B)


def test_kohya_text_encoder_names_keep_text_model_and_lora_te(state):
    tensors = to_kohya(state)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in tensors
    te_keys = [k for k in tensors if k.startswith("lora_te")]
    assert te_keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys)
    assert not any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors)
    assert not any("lora_A" in k or "lora_B" in k for k in tensors)


def test_kohya_alpha_is_the_real_alpha_not_the_rank(state):
    tensors = to_kohya(state)
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == state.count()
    for key, value in alphas.items():
        assert value.dim() == 0
        want = UNET_ALPHA if key.startswith("lora_unet_") else TE_ALPHA
        assert value.item() == want != UNET_R


def test_kohya_round_trip_is_bit_exact_in_fp32(tiny_pipe, state):
    back = from_kohya(to_kohya(state, torch.float32), pipeline_module_paths(tiny_pipe), "sd1")
    assert_same_state(state, back)


def test_kohya_round_trip_through_the_reference_table(state):
    back = from_kohya(to_kohya(state, torch.float32), reference_module_paths("sd1"), "sd1")
    assert_same_state(state, back)


def test_kohya_fp16_round_trip_is_close(tiny_pipe, state):
    back = from_kohya(to_kohya(state, torch.float16), pipeline_module_paths(tiny_pipe), "sd1")
    assert_same_state(state, back, exact=False)


def test_kohya_reads_lora_te1_and_missing_text_model_as_aliases(tiny_pipe, state):
    tensors = {k.replace("lora_te_text_model_", "lora_te1_"): v for k, v in to_kohya(state).items()}
    back = from_kohya(tensors, pipeline_module_paths(tiny_pipe), "sd1")
    assert set(back.modules["text_encoder"]) == set(state.modules["text_encoder"])
    assert all(p.startswith("text_model.") for p in back.modules["text_encoder"])


def test_kohya_without_alpha_means_alpha_equals_rank(tiny_pipe, state):
    tensors = {k: v for k, v in to_kohya(state).items() if not k.endswith(".alpha")}
    back = from_kohya(tensors, pipeline_module_paths(tiny_pipe), "sd1")
    assert back.alphas() == {float(UNET_R)}


def test_kohya_modules_the_base_lacks_are_reported_and_a_foreign_file_refused(tiny_pipe, state,
                                                                              tmp_path):
    """A few modules the base lacks: left out and listed (never silently). Mostly foreign
    modules: an error naming the likely cause."""
    tensors = to_kohya(state)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(8, 4)
    back = from_kohya(tensors, pipeline_module_paths(tiny_pipe), "sd1")
    assert back.count() == state.count()
    assert list(back.unmatched) == ["lora_unet_down_blocks_9_attentions_0_proj_in"]
    assert "1 in the file match nothing and are left out (lora_unet_down_blocks_9" in back.coverage()
    from sd_lora.adapters.inspect import format_inspection, inspect_adapter

    path = tmp_path / "extra.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    assert "match nothing and are left out" in format_inspection(inspect_adapter(path))

    sdxl_like = {}
    for i in range(1, 6):  # LDM block names, as sd-scripts writes SDXL UNet keys; SDXL's deep
        # levels have 10 transformer blocks, SD 1.x's one (LDM names SD 1.x has are read as SD 1.x)
        name = f"lora_unet_input_blocks_7_1_transformer_blocks_{i}_attn1_to_q"
        sdxl_like[f"{name}.lora_down.weight"] = torch.zeros(4, 8)
        sdxl_like[f"{name}.lora_up.weight"] = torch.zeros(8, 4)
    with pytest.raises(KohyaKeyError, match="5 of the file's 5 kohya modules match no sd1 module"
                                            ".*looks like an SDXL LoRA.*the base is SD 1.x"):
        from_kohya(sdxl_like, pipeline_module_paths(tiny_pipe), "sd1")
    wide = {k: v for k, v in to_kohya(state).items()}
    for key in [k for k in wide if "attn2_to_k.lora_down" in k]:
        wide[key] = torch.zeros(4, 1024)  # SD 2.x text features, on modules named like SD 1.x
    renamed = {k.replace("lora_unet_", "lora_unet_x"): v for k, v in wide.items()}
    with pytest.raises(KohyaKeyError, match="1024 wide, as SD 2.x does; the base is SD 1.x"):
        from_kohya(renamed, pipeline_module_paths(tiny_pipe), "sd1")
    same_width = {k: (torch.zeros(4, 768) if "attn2_to_k.lora_down" in k else v)
                  for k, v in renamed.items()}  # the base's own width: not the cause
    with pytest.raises(KohyaKeyError, match="for another architecture") as err:
        from_kohya(same_width, pipeline_module_paths(tiny_pipe), "sd1")
    assert "as SD 1.x does" not in str(err.value)


@pytest.mark.parametrize(
    "key, message",
    [
        ("lora_unet_x.weird_w1", "not a LoRA, LoHa or LoKr tensor"),
        ("lora_vae_x.lora_down.weight", "no known kohya prefix"),
    ],
)
def test_kohya_unknown_keys_are_errors(key, message):
    with pytest.raises(KohyaKeyError, match=message):
        parse_kohya_key(key)


def test_parse_kohya_key_without_a_model():
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    assert parse_kohya_key(key) == ("text_encoder", key.split(".")[0], "lora_up")
    assert parse_kohya_key("lora_te2_x.alpha").component == "text_encoder_2"
    assert parse_kohya_key("lora_unet_a_b.lora_down.weight").kind == "lora_down"


def test_sd1_kohya_file_with_ldm_unet_names_is_read(state, tiny_pipe):
    """Some older SD 1.x tools name the UNet in LDM form (`lora_unet_input_blocks_1_1_...` for
    `down_blocks.0.attentions.0`): read against the model and model-free, the same modules."""
    from sd_lora.formats.kohya import LDM_UNET_LAYOUTS, kohya_module_name, module_tensors
    from sd_lora.formats.ldm_checkpoint import map_module_name, unet_module_table

    table = unet_module_table(LDM_UNET_LAYOUTS["sd1"])
    tensors = {}
    for component, modules in state.modules.items():
        for path, module in modules.items():
            name = (kohya_module_name("lora_unet", map_module_name(path, table)) if component == "unet"
                    else kohya_module_name("lora_te", path))
            tensors.update(module_tensors(name, module, torch.float32))
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha" in tensors
    assert "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_out_0.alpha" in tensors  # OUT0
    for paths in (pipeline_module_paths(tiny_pipe), reference_module_paths("sd1")):
        assert_same_state(state, from_kohya(tensors, paths, "sd1"))
    assert not any("input_blocks" in k for k in to_kohya(state))  # written with diffusers names


def test_an_sd1_adapter_labelled_sdxl_is_refused_naming_the_module(state):
    """SDXL's kohya names are LDM names of SDXL's block layout; an SD 1.x UNet's
    `down_blocks.0.attentions` has none (SDXL's first level has no attention)."""
    state.family = "sdxl"
    with pytest.raises(KohyaKeyError, match="down_blocks.0.attentions.0.*no LDM name"):
        to_kohya(state)


# --- diffusers -------------------------------------------------------------------------------


def test_diffusers_layout_and_config_metadata(state):
    tensors, metadata = to_diffusers(state)
    assert f"unet.{Q0}.lora_A.weight" in tensors
    assert f"text_encoder.{TE_Q0}.lora_B.weight" in tensors
    config = json.loads(metadata[METADATA_KEY])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (UNET_R, UNET_ALPHA)
    assert (config["text_encoder.r"], config["text_encoder.lora_alpha"]) == (TE_R, TE_ALPHA)
    assert "encoder.layers.0.self_attn.q_proj" in config["text_encoder.target_modules"]


def test_diffusers_round_trip_is_bit_exact_in_fp32(state):
    tensors, metadata = to_diffusers(state, torch.float32)
    assert_same_state(state, from_diffusers(tensors, metadata, "sd1"))


def test_diffusers_keeps_per_module_rank_and_alpha(state):
    unet = state.modules["unet"]
    unet[Q0] = LoraModule(unet[Q0].lora_A[:2], unet[Q0].lora_B[:, :2], alpha=3.0)
    unet[OUT0].alpha = 16.0
    tensors, metadata = to_diffusers(state, torch.float32)
    config = json.loads(metadata[METADATA_KEY])
    assert config["unet.rank_pattern"] == {Q0: 2}
    assert config["unet.alpha_pattern"] == {Q0: 3.0, OUT0: 16.0}
    assert_same_state(state, from_diffusers(tensors, metadata, "sd1"))


def test_diffusers_without_metadata_means_alpha_equals_rank(state):
    tensors, _ = to_diffusers(state, torch.float32)
    assert from_diffusers(tensors, None, "sd1").alphas() == {float(UNET_R)}


# --- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_file_round_trip_detects_the_layout(tmp_path, tiny_pipe, state, fmt):
    path = save_adapter(state, tmp_path / f"a_{fmt}.safetensors", format=fmt, dtype=torch.float32)
    assert_same_state(state, load_adapter(path))
    assert_same_state(state, load_adapter(path, module_paths=pipeline_module_paths(tiny_pipe)))


def test_format_conversion_keeps_training_metadata(tmp_path, state):
    state.metadata = {"ss_output_name": "cat", "ss_steps": "10", "sshs_model_hash": "stale"}
    kohya_file = save_adapter(state, tmp_path / "k.safetensors", dtype=torch.float32)
    loaded = load_adapter(kohya_file)
    converted = load_adapter(save_adapter(loaded, tmp_path / "d.safetensors", format="diffusers"))
    assert converted.metadata["ss_output_name"] == "cat"
    assert converted.metadata["sshs_model_hash"] != "stale"


@pytest.mark.parametrize("name", ["a.ckpt", "a.pt", "a.bin"])
def test_pickles_are_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterFileError, match="pickles"):
        load_adapter(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_files_name_the_file(tmp_path, state, damage):
    good = save_adapter(state, tmp_path / "good.safetensors").read_bytes()
    bad = tmp_path / f"{damage}.safetensors"
    bad.write_bytes(
        {"truncated": good[: len(good) // 2], "garbage": b"hello" * 99, "empty": b""}[damage]
    )
    with pytest.raises(AdapterFileError, match=f"{damage}.safetensors"):
        load_adapter(bad)


def test_unknown_layout_and_unknown_family_are_errors(tmp_path, state):
    other = tmp_path / "other.safetensors"
    save_file({"model.weight": torch.zeros(2)}, str(other))
    with pytest.raises(AdapterFileError, match="not a LoRA"):
        load_adapter(other)
    bare = tmp_path / "bare.safetensors"
    save_file(to_kohya(state), str(bare))  # no metadata, and the tiny widths say nothing
    with pytest.raises(AdapterFileError, match="family"):
        load_adapter(bare)
    assert load_adapter(bare, family="sd1").count() == state.count()


def test_fuzzed_files_give_a_clear_error_or_load_and_never_crash(tmp_path, state, capsys):
    """200 damaged copies of a good adapter (bytes flipped in the header or the data, or cut
    short): reading each either works (a flip inside a tensor is still a tensor) or raises
    AdapterFileError naming the file; `sd-lora inspect` exits 0 or 2, never with a traceback."""
    import random

    from sd_lora.cli.main import main

    good = save_adapter(state, tmp_path / "good.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    rng = random.Random(8)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(200):
        data = bytearray(good)
        kind = i % 4
        if kind == 3:
            data = data[: rng.randrange(len(data))]
        else:
            span = (0, 8) if kind == 0 else (8, header_end) if kind == 1 else (header_end, len(data))
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(*span)] = rng.randrange(256)
        path = tmp_path / f"fuzz{i}.safetensors"
        path.write_bytes(bytes(data))
        try:
            load_adapter(path)
            outcomes["loaded"] += 1
        except AdapterFileError as e:
            assert str(path) in str(e), e
            outcomes["refused"] += 1
        assert main(["inspect", str(path)]) in (0, 1, 2)  # 1: read, but damaged
        err = capsys.readouterr().err
        assert "Traceback" not in err
    assert outcomes["refused"] >= 100 and outcomes["loaded"] >= 20, outcomes
