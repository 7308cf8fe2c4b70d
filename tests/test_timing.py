"""timing.json: every run says where its time and memory went."""

from __future__ import annotations

import json

from sd_lora.train.recipe import train
from sd_lora.train.timing import timing_line
from sd_lora.util.phases import PhaseClock, phase
from tests.test_train import job


def test_a_run_writes_its_phases_step_times_and_peak_memory(tmp_path, capsys):
    result = train(job(tmp_path, "train.max_steps=5", "train.checkpoint_every=2",
                       "report.enabled=true", "train.eval_images=2"), show_progress=False)
    timing = json.loads((result.output_dir / "timing.json").read_text())
    assert {"model", "latent cache", "evaluation", "training", "samples", "export",
            "report"} <= set(
        timing["phases_s"]), timing["phases_s"]
    assert timing["steps"]["count"] == 5
    assert 0 < timing["steps"]["median_s_per_step"] < timing["phases_s"]["training"]
    # the phases are parts of the whole
    assert sum(timing["phases_s"].values()) <= timing["total_s"] + 0.1, timing
    assert timing["peak_rss_gib"] > 0.1 and timing["peak_cuda_gib"] is None
    assert timing["device"] == "cpu" and timing["mixed_precision"] == "no"
    out = capsys.readouterr().out
    assert "s/step (median)" in out and "(timing.json)" in out


def test_a_resumed_run_times_only_the_steps_it_ran(tmp_path):
    train(job(tmp_path, "train.max_steps=4", "train.checkpoint_every=2"), show_progress=False)
    resumed = train(job(tmp_path, "train.max_steps=7", "train.checkpoint_every=2"), resume=True,
                    show_progress=False)
    timing = json.loads((resumed.output_dir / "timing.json").read_text())
    assert timing["steps"]["count"] == 3  # steps 5, 6 and 7


def test_phases_add_up_by_name_inside_a_clock_and_not_outside():
    with PhaseClock() as clock:
        for _ in range(2):
            with phase("report", "rendering"):
                pass
    with phase("report", "after the clock closed"):
        pass
    assert list(clock.seconds) == ["report"] and clock.seconds["report"] >= 0


def test_the_console_line_names_the_longest_phases_first():
    record = {"total_s": 100.0, "phases_s": {"export": 0.01, "training": 60.7, "report": 38.8},
              "steps": {"median_s_per_step": 0.19}, "peak_rss_gib": 1.234}
    line = timing_line(record)
    assert line.startswith("time: 100 s in all (training 60.7, report 38.8 s); 0.190 s/step")
    assert "export" not in line and "1.23 GiB" in line
