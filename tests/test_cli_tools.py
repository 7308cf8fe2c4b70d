"""`sd-lora convert | merge | resize | extract` on real files: lossless conversions, merges that
equal the sum of deltas (and a checkpoint with the adapters baked in), resizes that report what
they keep, and extraction that recovers a known adapter from two checkpoints."""

from __future__ import annotations

import torch
from safetensors import safe_open

from sd_lora.adapters.apply import apply_adapters
from sd_lora.adapters.files import load_adapter, save_adapter
from sd_lora.cli.main import main
from sd_lora.formats.metadata import file_hashes
from sd_lora.models.builtin.tiny import build_tiny_pipeline
from sd_lora.models.load import load_pipeline
from sd_lora.models.single_file import save_single_file
from tests.test_formats import random_state
from tests.test_models import assert_same_outputs
from tests.test_transforms import deltas


def tensors_and_metadata(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def adapters(tmp_path, tiny_pipe):
    a = random_state(tiny_pipe, seed=0)
    a.metadata = {"ss_output_name": "a", "ss_steps": "100"}
    b = random_state(tiny_pipe, seed=1)
    return (save_adapter(a, tmp_path / "a.safetensors", dtype=torch.float32),
            save_adapter(b, tmp_path / "b.safetensors", dtype=torch.float32))


def test_convert_round_trip_is_bit_exact_with_fresh_hashes(tmp_path, tiny_pipe, capsys):
    a, _ = adapters(tmp_path, tiny_pipe)
    assert main(["convert", str(a), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"),
                 "--to", "kohya"]) == 0
    original, _ = tensors_and_metadata(a)
    back, metadata = tensors_and_metadata(tmp_path / "k.safetensors")
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)  # fp32 in, fp32 out
    assert metadata["ss_output_name"] == "a" and metadata["ss_steps"] == "100"
    blob = (tmp_path / "k.safetensors").read_bytes()
    assert metadata["sshs_model_hash"] == file_hashes(blob)["sshs_model_hash"]


def test_merge_exact_compressed_and_into_a_base(tmp_path, tiny_pipe, capsys):
    a, b = adapters(tmp_path, tiny_pipe)
    out = tmp_path / "ab.safetensors"
    assert main(["merge", f"{a}:0.7", f"{b}:-0.5", "--out", str(out), "--dtype", "fp32"]) == 0
    assert "exact (ranks concatenated)" in capsys.readouterr().out
    got, da, db = deltas(load_adapter(out)), deltas(load_adapter(a)), deltas(load_adapter(b))
    for key, delta in got.items():
        torch.testing.assert_close(delta, 0.7 * da[key] - 0.5 * db[key], rtol=1e-5, atol=1e-5)
    _, metadata = tensors_and_metadata(out)
    assert metadata["ss_network_dim"] == "8"  # the new rank, not the sources'

    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "r2.safetensors"),
                 "--rank", "2"]) == 0
    text = capsys.readouterr().out
    assert "compressed to rank 2" in text and "largest relative error" in text

    base = save_single_file(build_tiny_pipeline(), tmp_path / "base.safetensors", torch.float32)
    baked = tmp_path / "baked.safetensors"
    assert main(["merge", f"{a}:0.7", f"{b}:0.3", "--into", str(base), "--out", str(baked),
                 "--dtype", "fp32"]) == 0
    expected = load_pipeline(str(base))
    apply_adapters(expected, [(load_adapter(a), 0.7, 0.7), (load_adapter(b), 0.3, 0.3)])
    assert_same_outputs(expected, load_pipeline(str(baked)))  # our loader (from_single_file)


def test_resize_fixed_and_dynamic(tmp_path, tiny_pipe, capsys):
    a, _ = adapters(tmp_path, tiny_pipe)
    assert main(["resize", str(a), "--rank", "2", "--out", str(tmp_path / "r2.safetensors")]) == 0
    assert load_adapter(tmp_path / "r2.safetensors").ranks() == {2}
    assert main(["resize", str(a), "--rank", "4", "--sv-fro", "0.999", "--verbose",
                 "--out", str(tmp_path / "dyn.safetensors"), "--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "energy kept" in text
    dynamic = load_adapter(tmp_path / "dyn.safetensors")
    assert dynamic.ranks() <= {1, 2, 3, 4}
    assert main(["resize", str(a), "--rank", "4", "--sv-ratio", "0.5",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "sv_ratio = 0.5 must be at least 1" in capsys.readouterr().err


def test_extract_recovers_an_adapter_baked_into_a_checkpoint(tmp_path, tiny_pipe, capsys):
    a, _ = adapters(tmp_path, tiny_pipe)
    base = save_single_file(build_tiny_pipeline(), tmp_path / "base.safetensors", torch.float32)
    tuned = tmp_path / "tuned.safetensors"
    assert main(["merge", str(a), "--into", str(base), "--out", str(tuned), "--dtype", "fp32"]) == 0
    out = tmp_path / "extracted.safetensors"
    assert main(["extract", "--base", str(base), "--tuned", str(tuned), "--rank", "4",
                 "--out", str(out), "--dtype", "fp32"]) == 0
    assert "extracted" in capsys.readouterr().out
    want, got = deltas(load_adapter(a)), deltas(load_adapter(out))
    assert set(got) == set(want)  # exactly the layers the adapter changed
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-3, atol=2e-5)
