"""Training jobs: real detached `sd-lora train` processes, followed from their files only."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from sd_lora.config import ConfigError, load_config, load_config_text
from sd_lora.services.jobs import PRESETS, JobError, JobManager, preset_toml
from sd_lora.services.session import GenerateRequest, GenerationSession, adapter_setting
from sd_lora.services.workspace import PathOutsideError, Workspace, WorkspaceError, list_adapters
from sd_lora.train.checkpoint import list_checkpoints
from sd_lora.train.recommended import RECOMMENDED, with_recommended

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the job shares 2 cores with pytest (and maybe more)
FAST = ["sample.steps=2", "sample.prompts=['zkstripes']"]


@pytest.fixture
def space(tmp_path) -> Workspace:
    space = Workspace.create(tmp_path / "adapters")
    shutil.copytree(REPO / "datasets" / "sample_stripes", space.runs / "uploads" / "stripes")
    return space


def wait_until(predicate, timeout: float = 150.0, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"still waiting after {timeout} s")


def test_preset_toml_is_a_complete_valid_config(tmp_path):
    text = preset_toml("quick", "tiny", "data/x", "style", ["train.max_steps=5"])
    path = tmp_path / "job.toml"
    path.write_text(text)
    config = load_config(path)
    assert (config.model.base, config.data.path, config.train.name) == ("tiny", "data/x", "style")
    # The learning rates are left to the base (0: its recommendation, filled in when it runs).
    assert (config.train.max_steps, config.train.learning_rate) == (5, 0.0)
    assert with_recommended(config).train.learning_rate == RECOMMENDED["tiny"].learning_rate
    # Without a regularization folder the preset's regularization settings are left out (they
    # would act on nothing, and the config refuses them); with one they are in.
    assert (config.data.regularization, config.data.regularization_target) == ("", "noise")
    path.write_text(preset_toml("quick", "toy", "data/x", "style", regularization="data/plain"))
    with_plain = load_config(path).data
    assert (with_plain.regularization, with_plain.regularization_target,
            with_plain.regularization_weight) == ("data/plain", "base", 10.0)
    standard = tmp_path / "standard.toml"
    standard.write_text(preset_toml("standard", "sd15", "d", "n"))
    assert (load_config(standard).lora.unet_r, load_config(standard).train.max_steps) == (16, 1500)
    assert {"quick", "standard"} <= set(PRESETS)
    with pytest.raises(JobError, match="unknown preset 'fast'"):
        preset_toml("fast", "tiny", "d", "n")
    with pytest.raises(JobError, match="name 'a/b'"):
        preset_toml("quick", "tiny", "d", "a/b")
    with pytest.raises(ConfigError, match="train.lerning_rate"):
        preset_toml("quick", "tiny", "d", "n", ["train.lerning_rate=1"])


def test_the_job_toml_holds_the_bases_recommended_steps_and_rates(space):
    """The app writes job.toml with what will run (and job.json's max_steps for progress), so
    the preset's 0s (the base's recommendation) are filled in for the chosen base."""
    data = space.runs / "uploads" / "stripes"
    config = JobManager(space).job_config(preset_toml("quick", "tiny", data, "s"), data, "s")
    tiny = RECOMMENDED["tiny"]
    assert (config.train.max_steps, config.train.learning_rate,
            config.train.text_encoder_learning_rate) == (tiny.max_steps, tiny.learning_rate,
                                                         tiny.text_encoder_learning_rate)
    mine = JobManager(space).job_config(
        preset_toml("quick", "tiny", data, "s", ["train.learning_rate=3e-4"]), data, "s")
    assert mine.train.learning_rate == 3e-4  # a value given stays


def test_bad_input_is_refused_before_anything_is_written(space, tmp_path):
    jobs = JobManager(space)
    data = space.runs / "uploads" / "stripes"
    good = preset_toml("quick", "tiny", data, "x")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    before = sorted(p.name for p in space.runs.iterdir())
    cases = [
        (JobError, "must be a folder inside the workspace", (outside, good, "x")),
        (JobError, "name '../x'", (data, good, "../x")),
        (ConfigError, "TOML is not valid", (data, "[train\nx=", "x")),
        (ConfigError, "unknown config key 'extra'", (data, good + "\n[extra]\n", "x")),
        (ConfigError, "'train.max_stepz'", (data, good.replace("max_steps", "max_stepz"), "x")),
        (WorkspaceError, "base '/etc' is not 'toy' or 'tiny'", (data, good.replace('"tiny"', '"/etc"'), "x")),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            jobs.start(*args)
    (space.adapters / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(JobError, match="taken.safetensors already exists"):
        jobs.start(data, good, "taken")
    assert sorted(p.name for p in space.runs.iterdir()) == before
    with pytest.raises(PathOutsideError):
        jobs.status("../adapters")
    with pytest.raises(JobError, match="no job 'nope'"):
        jobs.status("nope")


def test_a_quick_job_trains_publishes_its_adapter_and_survives_a_restart(space):
    torch.set_num_threads(1)
    jobs = JobManager(space, extra_env=ONE_THREAD)
    data = space.runs / "uploads" / "stripes"
    job_id = jobs.start(data, preset_toml("quick", "tiny", data, "stripes",
                                          ["train.max_steps=3"] + FAST), "stripes")
    assert (space.runs / job_id / "job.toml").is_file() and job_id.endswith("-stripes")
    status = wait_until(lambda: (s := jobs.status(job_id)).state != "running" and s)
    assert status.state == "done", status.message
    assert (status.step, status.max_steps, len(status.losses)) == (3, 3, 3)
    assert status.adapter == space.adapters / "stripes.safetensors" and status.adapter.is_file()
    assert [p.name for p in status.samples] == ["final.png"]
    assert (space.adapters / "stripes.preview.png").is_file()
    listed = {a.name: a for a in list_adapters(space)}["stripes"]
    assert (listed.family, listed.problem, listed.preview) == ("sd1", None,
                                                               space.adapters / "stripes.preview.png")
    restarted = JobManager(space).list_jobs()  # a new app instance: files only
    assert [(s.job_id, s.state, s.adapter) for s in restarted] == [(job_id, "done", status.adapter)]
    image = GenerationSession(space).generate(GenerateRequest(
        prompt="zkstripes", seed=1, steps=2, adapters=(adapter_setting("stripes", 0.8, 0.8),)))[0]
    assert image.path.is_file()


def test_cancel_stops_a_long_job_with_a_checkpoint(space):
    jobs = JobManager(space, extra_env=ONE_THREAD)
    data = space.runs / "uploads" / "stripes"
    text = preset_toml("quick", "tiny", data, "long", ["train.max_steps=500"] + FAST)
    job_id = jobs.start(data, text, "long")
    running = wait_until(lambda: (s := jobs.status(job_id)).losses and s)
    assert running.state == "running" and running.max_steps == 500, running.message
    assert running.eta_seconds is not None and running.eta_seconds > 0
    with pytest.raises(JobError, match=f"job {job_id} is still running"):
        jobs.start(data, preset_toml("quick", "tiny", data, "other"), "other")
    jobs.cancel(job_id)
    status = wait_until(lambda: (s := jobs.status(job_id)).state != "running" and s)
    assert status.state == "cancelled", status.message
    assert 1 <= status.step < 500 and status.adapter is None
    # Saved on SIGINT at the step reached (the preset's periodic checkpoints come at 20, 40...);
    # the signal may land after an optimizer step and before its loss line is written.
    saved = list_checkpoints(space.runs / job_id)
    assert saved and int(saved[-1].name.split("-")[1]) in (status.step, status.step + 1), saved
    assert json.loads((space.runs / job_id / "exit.json").read_text())["code"] == 130
    assert not (space.adapters / "long.safetensors").exists()
    with pytest.raises(JobError, match="is not running"):
        jobs.cancel(job_id)
    assert JobManager(space).status(job_id).state == "cancelled"


def test_failed_and_vanished_jobs_are_reported_from_files(space):
    jobs = JobManager(space)
    for job_id, exit_record, log in [
        ("20260101-000000-failed", {"code": 2}, "loading\nerror: base 'x' is not an existing file\n"),
        ("20260101-000001-vanished", None, "step 1\nKilled\n"),
    ]:
        run = space.runs / job_id
        run.mkdir()
        (run / "job.json").write_text(json.dumps({"job_id": job_id, "name": job_id, "pid": 999999999,
                                                  "started": 1.0, "max_steps": 10}))
        (run / "train.log").write_text(log)
        if exit_record is not None:
            (run / "exit.json").write_text(json.dumps(exit_record))
    failed = jobs.status("20260101-000000-failed")
    assert failed.state == "failed" and "error: base 'x'" in failed.message
    vanished = jobs.status("20260101-000001-vanished")
    assert vanished.state == "failed" and "ended without reporting" in vanished.message
    assert "Killed" in vanished.message
    assert [s.job_id for s in jobs.list_jobs()] == ["20260101-000001-vanished", "20260101-000000-failed"]


def test_a_dataset_in_the_datasets_folder_trains_and_others_are_refused(tmp_path):
    """`sd-lora app --datasets DIR`: its folders are trainable in place (read only); a folder
    outside every workspace folder is refused before anything is written."""
    library = tmp_path / "pictures"
    shutil.copytree(REPO / "datasets" / "sample_stripes", library / "stripes")
    space = Workspace.create(tmp_path / "adapters", datasets=library)
    jobs = JobManager(space, extra_env=ONE_THREAD)
    outside = tmp_path / "elsewhere"
    shutil.copytree(REPO / "datasets" / "sample_stripes", outside)
    with pytest.raises(JobError, match="must be a folder inside the workspace"):
        jobs.start(outside, preset_toml("quick", "tiny", outside, "x"), "x")
    assert not any(space.runs.iterdir())
    data = library / "stripes"
    job_id = jobs.start(data, preset_toml("quick", "tiny", data, "lib", ["train.max_steps=2"] + FAST),
                        "lib")
    status = wait_until(lambda: (s := jobs.status(job_id)).state != "running" and s)
    assert status.state == "done", status.message
    assert sorted(p.name for p in data.iterdir()) == sorted(
        p.name for p in (REPO / "datasets" / "sample_stripes").iterdir())  # nothing written there


def test_the_apps_job_on_the_toy_base_trains_with_the_toy_worlds_plain_scenes(space):
    """As the demo does: a quick job without regularization images leaked its style into
    prompts without the trigger word (off-style +75%). The app writes the toy world's plain
    scenes into its own folders (a job reads nothing outside them) and names them."""
    pytest.importorskip("gradio")
    from sd_lora_app.train_tab import TrainTab

    tab = TrainTab(space, JobManager(space))
    fields = [None] * 4  # the number fields left empty: the preset's values
    text = tab.job_toml("quick", "toy", "uploads/stripes", "s", *fields)
    toy = load_config_text(text)
    plain = space.runs / "datasets" / "toy-plain"
    report, _ = tab.show_dataset("uploads/stripes", text)  # the plan counts them
    assert "16 images + 32 regularization images" in report, report
    assert "recommended for the toy base" in report, report
    assert toy.data.regularization == str(plain) and toy.data.regularization_target == "base"
    assert len(list(plain.glob("*.png"))) == len(list((REPO / "datasets/toy/plain").glob("*.png")))
    tiny = load_config_text(tab.job_toml("quick", "tiny", "uploads/stripes", "s", *fields))
    assert tiny.data.regularization == "" and tiny.data.regularization_weight == 1.0
