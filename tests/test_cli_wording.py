"""Small things the command line says: counts with proper plurals, a suggestion for a built-in
base's name typed in capitals, a warning for a training size far above the base's own, trigger
words that are tags, `resize` by singular values alone, and `generate --output` without .png."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from sd_lora.cli.main import main
from sd_lora.config import load_config

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"
TOY_DATA = SAMPLE_DATA.parent / "toy" / "pastel"


def test_counts_of_one_are_singular(tmp_path, tiny_pipe, capsys):
    from sd_lora.adapters.files import save_adapter
    from sd_lora.train.preflight import check_job
    from tests.test_formats import random_state

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(SAMPLE_DATA / "0000.png", one / "0000.png")
    shutil.copy(SAMPLE_DATA / "0000.txt", one / "0000.txt")
    text = check_job(load_config(None, [f'data.path="{one}"', "train.max_steps=1",
                                        "train.batch_size=1"])).text()
    assert "1 image, 1 training item per epoch" in text and "1 image (1 item per epoch)" in text
    assert "1 step of 1 image:" in text and "0 files skipped, 0 warnings" in text
    adapter = save_adapter(random_state(tiny_pipe), tmp_path / "a.safetensors", dtype=torch.float32)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "m.safetensors")]) == 0
    assert "merged 1 adapter, exact" in capsys.readouterr().out


@pytest.mark.parametrize("typed, meant", [("Toy", "toy"), ("TINY", "tiny"), ("tiny_sdxl", "tiny-sdxl")])
def test_a_built_in_base_typed_otherwise_gets_a_suggestion(typed, meant, capsys):
    code = main(["check", str(SAMPLE_DATA), "--set", f'model.base="{typed}"'])
    err = capsys.readouterr().err
    assert code == 2 and f"base {typed!r} is not an existing file" in err
    assert f"did you mean {meant!r}?" in err


def test_no_suggestion_for_a_name_far_from_every_built_in_base():
    from sd_lora.models.bases import builtin_suggestion

    assert builtin_suggestion("my-model") == "" and builtin_suggestion("toy") == "; did you mean 'toy'?"


def test_a_size_far_above_the_bases_own_is_warned_about_with_its_native_size(monkeypatch):
    from sd_lora.train import memory

    monkeypatch.setattr(memory, "available_gib", lambda: (22.7, "RAM"))
    config = load_config(None, [f'data.path="{TOY_DATA}"', 'model.base="toy"', "data.resolution=512"])
    line = memory.plan_line(config)
    assert "warning: that is more than 50% of the RAM available" in line  # 20.8 of 22.7 GiB
    assert "data.resolution 512 is 8x the base's native size, 64 px" in line
    assert "Train at 64 (--resolution 64)" in line
    assert memory.native_size("toy") == memory.native_size("tiny") == 64
    native = load_config(None, [f'data.path="{TOY_DATA}"', 'model.base="toy"', "data.resolution=64"])
    assert "warning" not in memory.plan_line(native)
    tiny = load_config(None, [f'data.path="{TOY_DATA}"', 'model.base="tiny"', "data.resolution=512"])
    assert "8x the base's native size, 64 px" in memory.plan_line(tiny)  # no memory line for it


def test_trigger_words_are_recurring_tags_not_whole_captions():
    from sd_lora.adapters.inspect import trigger_words

    captions = {f"zkpastel, {n} red circles on a blue background": 1 for n in range(12)}
    metadata = {"modelspec.trigger_phrase": "zkpastel",
                "ss_tag_frequency": json.dumps({"pastel": {"zkpastel": 12, **captions}})}
    assert trigger_words(metadata) == ["zkpastel"]
    del metadata["modelspec.trigger_phrase"]  # a file from another trainer: frequency alone
    metadata["ss_tag_frequency"] = json.dumps({"a": {"zkx": 9, "1girl": 5, "a sunny day": 1}})
    assert trigger_words(metadata) == ["zkx", "1girl"]


def test_resize_by_singular_values_needs_no_rank(tmp_path, tiny_pipe, capsys):
    from sd_lora.adapters.files import load_adapter
    from tests.test_cli_tools import adapters

    a, _ = adapters(tmp_path, tiny_pipe)
    ranks = load_adapter(a).ranks()
    assert main(["resize", str(a), "--sv-fro", "0.9", "--out", str(tmp_path / "f.safetensors")]) == 0
    resized = load_adapter(tmp_path / "f.safetensors").ranks()
    assert max(resized) <= max(ranks) and resized != ranks  # each module's own rank is the cap
    capsys.readouterr()
    assert main(["resize", str(a), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--rank N" in err and "--sv-ratio, --sv-fro, --sv-cumulative" in err


def test_generate_output_without_an_extension_gets_png_and_another_is_refused(tmp_path, capsys):
    base = ["generate", "--base", "tiny", "--prompt", "a red circle", "--steps", "2"]
    assert main([*base, "--output", str(tmp_path / "g6")]) == 0
    assert Image.open(tmp_path / "g6.png").format == "PNG" and not (tmp_path / "g6").exists()
    assert capsys.readouterr().out.strip() == str(tmp_path / "g6.png")
    assert main([*base, "--output", str(tmp_path / "g6.jpg")]) == 2
    assert f"name it {tmp_path / 'g6.png'}" in capsys.readouterr().err
