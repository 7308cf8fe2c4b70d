"""Without data.resolution the images train at the base's native size, and `train` warns about
those smaller than that size, as `check --resolution` does."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from sd_lora.config import load_config
from sd_lora.train.preflight import check_job
from sd_lora.train.recipe import train
from tests.test_train import SAMPLE_DATA, job


@pytest.fixture
def with_a_dot(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DATA, data)
    Image.new("RGB", (1, 1), (200, 40, 40)).save(data / "dot.png")
    (data / "dot.txt").write_text("a red dot")
    return data


def test_check_at_the_native_size_adds_the_small_image_warnings(with_a_dot):
    config = load_config(None, [f'data.path="{with_a_dot}"', 'model.base="tiny"'])
    check = check_job(config)
    assert not [w for w in check.data.warnings if "below" in w.reason]  # no size known yet
    checked, added = check.at_native_size(64)
    assert [(w.path.name, w.reason) for w in added] == [
        ("dot.png", "1x1 is below 64 px on its shorter side: upscaled")]
    assert checked.warnings == check.warnings + 1 and "dot.png: 1x1 is below 64 px" in checked.text()
    # With data.resolution set the scan has warned already: nothing is added twice.
    explicit = check_job(load_config(None, [f'data.path="{with_a_dot}"', "data.resolution=64"]))
    assert explicit.at_native_size(64) == (explicit, [])


@pytest.mark.slow
def test_train_warns_about_images_below_the_bases_native_size(with_a_dot, tmp_path, capsys):
    config = job(tmp_path / "out", f'data.path="{with_a_dot}"', "data.resolution=0",
                 "train.max_steps=1", "report.enabled=false")
    train(config, show_progress=False)
    printed = capsys.readouterr().out
    assert "Warnings at the base's native size, 64 px (1):" in printed
    assert "dot.png: 1x1 is below 64 px on its shorter side: upscaled" in printed
    report = (tmp_path / "out" / "dataset_report.txt").read_text()
    assert "dot.png: 1x1 is below 64 px on its shorter side: upscaled" in report
