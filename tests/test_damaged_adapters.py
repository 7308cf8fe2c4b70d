"""Adapter files whose tensors hold NaN or inf (a diverged run's export, a damaged download), or
whose data no longer matches its stored hash: refused when loaded, naming the file and the
first bad tensor, instead of rendering black images; `inspect` describes them and exits 1."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from sd_lora.adapters.files import AdapterFileError, load_adapter, save_adapter
from sd_lora.cli.main import main
from tests.test_formats import random_state


def good_adapter(tmp_path, tiny_pipe):
    return save_adapter(random_state(tiny_pipe), tmp_path / "good.safetensors", dtype=torch.float32)


def damaged_copy(source, target, change) -> tuple:
    """`source`'s tensors with `change(tensors)` applied, its metadata (and stored hashes) kept
    as they were: what a bit flip in a download or a diverged export looks like."""
    tensors = safetensors.torch.load_file(source)
    with safetensors.safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    changed_key = change(tensors)
    safetensors.torch.save_file(tensors, target, metadata=metadata)
    return target, changed_key


def poison(value: float):
    """A change that puts `value` into the second (by key order) lora_up tensor."""

    def change(tensors) -> str:
        key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[1]
        tensors[key][0, 0] = value
        return key

    return change


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_loading_refuses_nonfinite_tensors_naming_file_and_tensor(tmp_path, tiny_pipe, value):
    path, key = damaged_copy(good_adapter(tmp_path, tiny_pipe), tmp_path / "bad.safetensors",
                             poison(value))
    with pytest.raises(AdapterFileError, match=rf"bad\.safetensors: tensor '{key}' holds 1 NaN/inf"):
        load_adapter(path)


def test_generate_with_a_nan_adapter_exits_2_and_writes_nothing(tmp_path, tiny_pipe, capsys):
    path, key = damaged_copy(good_adapter(tmp_path, tiny_pipe), tmp_path / "nan.safetensors",
                             poison(float("nan")))
    image = tmp_path / "out.png"
    code = main(["generate", "--base", "tiny", "--lora", str(path), "--prompt", "a red circle",
                 "--steps", "2", "--output", str(image)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "nan.safetensors" in err and key in err and "black images" in err
    assert not image.exists()


def test_inspect_exits_1_on_a_damaged_file_and_0_on_a_good_one(tmp_path, tiny_pipe, capsys):
    good = good_adapter(tmp_path, tiny_pipe)
    assert main(["inspect", str(good)]) == 0
    assert "DAMAGED" not in capsys.readouterr().out

    nan, key = damaged_copy(good, tmp_path / "nan.safetensors", poison(float("nan")))
    assert main(["inspect", str(nan)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED: {nan}: tensor '{key}' holds 1 NaN/inf" in out
    assert "unet:" in out  # still described in full

    def doubled(tensors) -> str:  # finite, but not the bytes that were hashed
        key = sorted(tensors)[0]
        tensors[key] *= 2
        return key

    changed, _ = damaged_copy(good, tmp_path / "changed.safetensors", doubled)
    assert main(["inspect", str(changed), "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["hashes"]["sshs_model_hash"]["agrees"] is False
    assert any("differs from the sshs_model_hash" in d for d in info["damage"])
