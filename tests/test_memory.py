"""The memory estimate printed before anything loads: parameter counts from configs and
headers, the estimate against the benchmark's measured peaks, and the warning with its fixes."""

from __future__ import annotations

import pytest
import torch

from sd_lora.config import load_config
from sd_lora.models.single_file import bundled_folder
from sd_lora.train.memory import (
    ParameterCounts,
    count_folder,
    count_single_file,
    estimate,
    plan_line,
)

SD15 = count_folder(bundled_folder("stable-diffusion-v1-5"))
SDXL = count_folder(bundled_folder("stable-diffusion-xl-base-1.0"))


def test_parameter_counts_come_from_the_configs():
    assert SD15.unet == 859_520_964 and SD15.text_encoders == 123_060_480  # SD 1.5's known sizes
    assert SDXL.unet == 2_567_463_684 and SDXL.text_encoders == 817_720_320


def test_a_single_files_counts_come_from_its_header(tmp_path):
    from sd_lora.models.builtin.tiny import build_tiny_pipeline
    from sd_lora.models.single_file import save_single_file

    pipe = build_tiny_pipeline()
    path = save_single_file(pipe, tmp_path / "t.safetensors", torch.float32)
    counts = count_single_file(path)
    assert counts.unet == sum(p.numel() for p in pipe.unet.parameters())
    assert counts.vae == sum(p.numel() for p in pipe.vae.parameters())


# bench/train_speed.py's measured peaks on this repository's 2-core CPU (bench/README.md)
@pytest.mark.parametrize("counts, resolution, precision, checkpointing, measured", [
    (SD15, 256, "no", False, 5.30), (SD15, 256, "bf16", False, 3.21),
    (SD15, 256, "no", True, 4.96), (SD15, 256, "bf16", True, 2.97),
    (SDXL, 512, "bf16", False, 10.34), (SDXL, 512, "bf16", True, 8.54),
])
def test_the_estimate_is_within_15_percent_of_the_measured_peaks(counts, resolution, precision,
                                                                 checkpointing, measured):
    guess = estimate(counts, resolution, 1, precision, checkpointing, available=(None, "RAM"))
    assert abs(guess.total_gib / measured - 1) < 0.15, guess


def test_a_job_that_will_not_fit_is_warned_about_with_the_fixes(monkeypatch):
    from sd_lora.train import memory

    monkeypatch.setattr(memory, "count_base", lambda base: SDXL)
    monkeypatch.setattr(memory, "available_gib", lambda: (8.0, "RAM"))
    config = load_config(None, ["data.resolution=1024", "train.batch_size=4"])
    line = plan_line(config)
    assert "of 8.0 GiB RAM available" in line and "warning: this will probably not fit" in line
    assert "mixed_precision = 'bf16'" in line and "gradient_checkpointing = true" in line
    small = ParameterCounts(10_000_000, 1_000_000, 1_000_000)
    monkeypatch.setattr(memory, "count_base", lambda base: small)
    assert "warning" not in plan_line(load_config(None, ["data.resolution=64"]))
