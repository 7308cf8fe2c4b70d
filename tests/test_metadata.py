"""Community metadata: string values, the keys per family, and hashes recomputed from the file."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import safetensors
import safetensors.torch
import torch

from sd_lora.adapters.files import load_adapter, reference_module_paths, save_adapter
from sd_lora.adapters.inspect import format_inspection, inspect_adapter
from sd_lora.formats.adapter_state import AdapterState, LoraModule
from sd_lora.formats.metadata import TrainingInfo, build_metadata, short_hash

INFO = TrainingInfo(
    name="cat-style",
    steps=500,
    learning_rate=1e-4,
    unet_lr=1e-4,
    text_encoder_lr=5e-5,
    seed=7,
    num_train_images=12,
    tag_frequency={"10_cat": {"cat": 12, "sks": 12}},
    comment="test run",
    mixed_precision="bf16",
    network_args={"targets": "attn"},
    base_model="tiny",
    started_at=1_700_000_000.5,
    finished_at=1_700_000_600.25,
    resolution=(512, 768),
)


def small_state(family: str = "sd1", r: int = 4, width: int = 32, count: int = 3) -> AdapterState:
    """`count` real SD 1.x attention paths (to_q first); shapes need not fit any model."""
    gen = torch.Generator().manual_seed(0)
    unet_paths = reference_module_paths("sd1")["unet"]
    attention = [p for kind in ("to_q", "to_k", "to_v") for p in unet_paths if p.endswith(kind)]
    unet = {
        path: LoraModule(
            torch.randn(r, width, generator=gen), torch.randn(width, r, generator=gen), alpha=8.0
        )
        for path in attention[:count]
    }
    te = {
        "text_model.encoder.layers.0.self_attn.q_proj": LoraModule(
            torch.randn(r, width, generator=gen), torch.randn(width, r, generator=gen), alpha=2.0
        )
    }
    return AdapterState(family=family, modules={"unet": unet, "text_encoder": te})


def header_and_data(path):
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :], blob


def test_every_value_is_a_string_and_the_keys_are_there(tmp_path):
    path = save_adapter(small_state(), tmp_path / "a.safetensors", info=INFO)
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert all(isinstance(v, str) for v in metadata.values())
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "8.0",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_v_parameterization": "False",
        "ss_resolution": "(512, 768)",
        "ss_output_name": "cat-style",
        "ss_steps": "500",
        "ss_learning_rate": "0.0001",
        "ss_text_encoder_lr": "5e-05",
        "ss_unet_lr": "0.0001",
        "ss_num_train_images": "12",
        "ss_seed": "7",
        "ss_training_comment": "test run",
        "ss_training_started_at": "1700000000.5",
        "ss_training_finished_at": "1700000600.25",
        "ss_mixed_precision": "bf16",
        "ss_sd_model_name": "tiny",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "cat-style",
        "modelspec.resolution": "512x768",
        "modelspec.prediction_type": "epsilon",
    }
    assert {k: metadata.get(k) for k in expected} == expected
    assert json.loads(metadata["ss_tag_frequency"]) == {"10_cat": {"cat": 12, "sks": 12}}
    assert json.loads(metadata["ss_network_args"]) == {"targets": "attn"}
    assert metadata["modelspec.date"].startswith("2023-11-1")



def test_recipe_keys_are_written_only_when_the_run_used_them():
    from dataclasses import replace

    plain = build_metadata(small_state(), INFO)
    for key in ("ss_min_snr_gamma", "ss_noise_offset", "ss_prior_loss_weight",
                "ss_num_reg_images", "modelspec.trigger_phrase"):
        assert key not in plain
    used = build_metadata(small_state(), replace(
        INFO, min_snr_gamma=5.0, noise_offset=0.1, prior_loss_weight=10.0, trigger_phrase="sks",
        num_reg_images=32))
    assert (used["ss_min_snr_gamma"], used["ss_noise_offset"], used["ss_prior_loss_weight"],
            used["ss_num_reg_images"], used["modelspec.trigger_phrase"]) == (
        "5.0", "0.1", "10.0", "32", "sks")


@pytest.mark.parametrize(
    "family, prediction, arch, version, v2, vpred",
    [
        ("sd1", "epsilon", "stable-diffusion-v1/lora", "sd_v1", "False", "False"),
        ("sd2", "epsilon", "stable-diffusion-v2-512/lora", "sd_v2", "True", "False"),
        ("sd2", "v_prediction", "stable-diffusion-v2-768-v/lora", "sd_v2", "True", "True"),
        ("sdxl", "epsilon", "stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0", "False", "False"),
    ],
)
def test_family_keys(family, prediction, arch, version, v2, vpred):
    info = TrainingInfo(name="x", prediction_type=prediction)
    metadata = build_metadata(small_state(family), info)
    assert metadata["modelspec.architecture"] == arch
    assert metadata["ss_base_model_version"] == version
    assert (metadata["ss_v2"], metadata["ss_v_parameterization"]) == (v2, vpred)
    assert metadata["modelspec.prediction_type"] == ("v" if vpred == "True" else "epsilon")


def test_info_family_must_match_the_adapter():
    with pytest.raises(ValueError, match="does not match"):
        build_metadata(small_state("sd1"), TrainingInfo(name="x", family="sd2"))


def test_bad_info_values_are_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        TrainingInfo(name="x", prediction_type="v")
    with pytest.raises(ValueError, match="tag_frequency"):
        TrainingInfo(name="x", tag_frequency={"cat": 3})


@pytest.mark.parametrize("fmt, dtype", [("kohya", torch.float16), ("diffusers", torch.float32)])
def test_hashes_equal_the_ones_recomputed_from_the_written_file(tmp_path, fmt, dtype):
    # r 64 x 40 modules x 256 wide: a file over 1 MiB, so the legacy hash reads real bytes.
    state = small_state(r=64, width=256, count=40)
    path = save_adapter(state, tmp_path / "a.safetensors", format=fmt, info=INFO, dtype=dtype)
    header, data, blob = header_and_data(path)
    metadata = header["__metadata__"]
    assert len(blob) > 0x110000
    assert metadata["sshs_model_hash"] == hashlib.sha256(data).hexdigest()
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    # sd-scripts' precalculate_safetensors_hashes: each tensor saved alone, bytes after the header.
    ordered = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )
    tensors = safetensors.torch.load_file(str(path))
    per_tensor = hashlib.sha256()
    for key in ordered:
        alone = safetensors.torch.save({"tensor": tensors[key]})
        (n,) = struct.unpack("<Q", alone[:8])
        per_tensor.update(alone[8 + n :])
    assert metadata["modelspec.hash_sha256"] == "0x" + per_tensor.hexdigest()


def test_short_hash_is_a1111s_twelve_digits(tmp_path):
    path = save_adapter(small_state(), tmp_path / "a.safetensors", info=INFO)
    _, data, _ = header_and_data(path)
    assert short_hash(load_adapter(path)) == hashlib.sha256(data).hexdigest()[:12]
    assert short_hash(small_state()) is None  # nothing stored


def test_without_info_only_what_the_state_tells(tmp_path):
    metadata = build_metadata(small_state("sd2"), None)
    assert metadata["ss_base_model_version"] == "sd_v2"
    assert "modelspec.architecture" not in metadata  # v or epsilon is unknown for SD 2.x
    assert "ss_output_name" not in metadata


def test_inspection_reports_hashes_and_layers(tmp_path):
    path = save_adapter(small_state(), tmp_path / "a.safetensors", info=INFO)
    info = inspect_adapter(path)
    assert info["format"] == "kohya" and info["family"] == "sd1" and info["problems"] == []
    assert info["components"]["unet"]["modules"] == 3
    assert info["components"]["unet"]["layer_kinds"] == {"to_q": 3}
    assert info["components"]["text_encoder"]["alphas"] == [2]
    assert all(check["agrees"] for check in info["hashes"].values())
    assert info["dtypes"] == ["float16"] and info["file_size"] == path.stat().st_size
    text = format_inspection(info)
    assert "sshs_model_hash" in text and "agrees" in text and "cat (12)" in text


def test_inspection_flags_a_tampered_hash(tmp_path):
    path = save_adapter(small_state(), tmp_path / "a.safetensors", info=INFO)
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"] *= 2
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    info = inspect_adapter(path)
    assert info["hashes"]["sshs_model_hash"]["agrees"] is False
    assert "DIFFERS" in format_inspection(info)


def test_inspection_describes_a_file_it_cannot_resolve(tmp_path):
    path = tmp_path / "odd.safetensors"
    safetensors.torch.save_file(
        {
            "lora_unet_input_blocks_9_1_proj_in.lora_down.weight": torch.zeros(8, 64),
            "lora_unet_input_blocks_9_1_proj_in.lora_up.weight": torch.zeros(64, 8),
        },
        str(path),
        metadata={"ss_base_model_version": "sd_v1"},
    )
    info = inspect_adapter(path)
    assert "input_blocks_9_1_proj_in" in info["problems"][0]  # SD 1.x input_blocks 9 has no attention
    assert info["components"]["unet"] == {
        "modules": 1,
        "layer_kinds": {"proj_in": 1},
        "ranks": [8],
        "alphas": [8],
    }
    assert "problem:" in format_inspection(info)


def test_a_runs_recipe_lands_in_the_keys_sd_scripts_uses():
    from pathlib import Path

    from sd_lora.config import load_config
    from sd_lora.data import scan_dataset
    from sd_lora.train.outputs import training_info

    sample = Path(__file__).resolve().parents[1] / "datasets" / "sample_stripes"
    config = load_config(None, ['train.lr_scheduler="cosine_with_restarts"', "train.lr_warmup_steps=50",
                                "data.caption_dropout=0.1", "data.shuffle_tags=true",
                                "data.keep_tokens=1", 'train.loss="huber"', "train.huber_c=0.2",
                                "train.gradient_accumulation_steps=2"])
    info = training_info(config, "sd1", "epsilon", scan_dataset(sample), 512, 1.7e9)
    metadata = build_metadata(small_state(), info)
    assert {k: metadata[k] for k in ("ss_lr_scheduler", "ss_lr_warmup_steps",
                                     "ss_caption_dropout_rate", "ss_shuffle_caption",
                                     "ss_keep_tokens", "ss_loss_type", "ss_huber_c",
                                     "ss_gradient_accumulation_steps")} == {
        "ss_lr_scheduler": "cosine_with_restarts", "ss_lr_warmup_steps": "50",
        "ss_caption_dropout_rate": "0.1", "ss_shuffle_caption": "True", "ss_keep_tokens": "1",
        "ss_loss_type": "huber", "ss_huber_c": "0.2", "ss_gradient_accumulation_steps": "2"}
    assert "ss_huber_c" not in build_metadata(small_state(), training_info(
        load_config(None), "sd1", "epsilon", scan_dataset(sample), 512, 1.7e9))
