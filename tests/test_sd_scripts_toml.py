"""sd-scripts dataset configs: read into sd-lora settings and subsets, errors that name keys,
and a run trained from one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from sd_lora.cli.main import main
from sd_lora.config import load_config
from sd_lora.data.sd_scripts_toml import DatasetTomlError, read_dataset_toml
from sd_lora.train.preflight import check_job, with_dataset_config

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"


def folders(tmp_path) -> tuple[Path, Path]:
    """A style folder (captions, some missing) and a regularization folder."""
    style, reg = tmp_path / "style", tmp_path / "reg"
    style.mkdir()
    reg.mkdir()
    for i, src in enumerate(sorted(SAMPLE_DATA.glob("*.png"))[:6]):
        shutil.copy(src, style / src.name)
        if i < 4:
            (style / f"{src.stem}.caption").write_text(f"stripes {i}")
    for i in range(3):
        Image.new("RGB", (64, 64), (20 * i, 120, 90)).save(reg / f"r{i}.png")
        (reg / f"r{i}.caption").write_text("a plain picture")
    return style, reg


TOML = """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".caption"

[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = true
bucket_reso_steps = 8
min_bucket_reso = 32
max_bucket_reso = 128

  [[datasets.subsets]]
  image_dir = "style"
  num_repeats = 3
  class_tokens = "zkstripes pattern"
  caption_prefix = "zkstripes, "
  caption_dropout_rate = 0.1

  [[datasets.subsets]]
  image_dir = "REG"
  is_reg = true
  num_repeats = 1
"""


def write_toml(tmp_path, reg: Path, text: str = TOML) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(text.replace('"REG"', f'"{reg}"'))
    return path


def test_settings_and_subsets_become_sd_lora_fields(tmp_path):
    _, reg = folders(tmp_path)
    path = write_toml(tmp_path, reg)
    toml = read_dataset_toml(path)
    assert toml.subsets[0].image_dir == (tmp_path / "style").resolve()  # relative to the file
    assert [s.is_reg for s in toml.subsets] == [False, True]
    config = with_dataset_config(load_config(None, [f'data.dataset_config="{path}"']))
    d, t = config.data, config.train
    assert (d.resolution, t.batch_size, d.enable_bucket, d.bucket_reso_steps) == (64, 2, True, 8)
    assert (d.min_bucket_reso, d.max_bucket_reso, d.shuffle_tags, d.keep_tokens) == (32, 128, True, 1)
    assert d.caption_extensions == (".caption",)
    check = check_job(config)
    style = check.data.samples
    assert len(style) == 6 and {s.repeats for s in style} == {3}
    captions = sorted(s.caption for s in style)
    assert captions[:2] == ["zkstripes, stripes 0", "zkstripes, stripes 1"]
    assert captions[-2:] == ["zkstripes, zkstripes pattern"] * 2  # no caption: the class tokens
    assert {s.caption_dropout for s in style} == {0.1}
    assert len(check.regularization.samples) == 3


@pytest.mark.parametrize("edit, message", [
    (("num_repeats = 3", "num_repeat = 3"), "unknown key 'num_repeat' \\(did you mean 'num_repeats'\\?\\)"),
    (("keep_tokens = 1", "color_aug = true"), "'color_aug' is not implemented"),
    (("resolution = 64", "resolution = [64, 96]"), "not square"),
    (("num_repeats = 3", "num_repeats = 0"), "num_repeats = 0 must be a positive integer"),
    (("[[datasets]]", "[[dataset]]"), "unknown key 'dataset'"),
])
def test_bad_dataset_configs_name_the_key(tmp_path, edit, message):
    _, reg = folders(tmp_path)
    path = write_toml(tmp_path, reg, TOML.replace(*edit))
    with pytest.raises(DatasetTomlError, match=message):
        read_dataset_toml(path)


def test_settings_that_differ_between_subsets_are_refused(tmp_path):
    _, reg = folders(tmp_path)
    text = TOML + '\n  [[datasets.subsets]]\n  image_dir = "style"\n  flip_aug = true\n'
    text = text.replace("[general]\n", "[general]\nflip_aug = false\n")
    with pytest.raises(DatasetTomlError, match="flip_aug = True, but another .* has False"):
        read_dataset_toml(write_toml(tmp_path, reg, text))


@pytest.mark.slow
def test_a_run_trains_from_an_sd_scripts_dataset_config(tmp_path):
    _, reg = folders(tmp_path)
    path = write_toml(tmp_path, reg)
    out = tmp_path / "run"
    assert main(["check", "--dataset-config", str(path)]) == 0
    code = main(["train", "--dataset-config", str(path), "--base", "tiny", "--output", str(out),
                 "--name", "t", "--max-steps", "3", "--no-progress", "--set", "sample.every=0",
                 "--set", "sample.steps=2", "--set", "report.enabled=false"])
    assert code == 0
    with safe_open(str(out / "t.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_shuffle_caption"] == "True" and metadata["ss_enable_bucket"] == "True"
    assert json.loads(metadata["ss_tag_frequency"]).keys() == {"style"}
    assert "dataset_config" in (out / "config.toml").read_text()
