"""The app's job check (sd_lora.services.job_guard): every path field inside the app's folders, relative
paths taken from the runs folder, the report's default folders looked for inside only, no
pickles; and a hub id written hf://org/name is never read from disk. The same refusals through
the running app: tests/test_app_folders.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest

from sd_lora.config import BASE, READS, UNPICKLES, WRITES, JobConfig, marked_fields
from sd_lora.models.bases import BaseModelError
from sd_lora.models.load import load_pipeline
from sd_lora.services.job_guard import JobRefused
from sd_lora.services.jobs import JobManager, preset_toml
from sd_lora.services.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
# Text fields that name no file or folder. A new text field must be added here or declared
# with a path type in sd_lora/config.py (ReadPath, WritePath), so the app checks it.
NOT_PATHS = {
    "data.caption_extensions", "lora.unet_targets", "lora.text_encoder_targets",
    "lora.rank_pattern", "lora.alpha_pattern", "train.name", "train.optimizer_args",
    "sample.prompts", "sample.negative_prompt", "export.comment", "report.prompts", "report.style",
}


def text_fields() -> list[str]:
    """The dotted names of every str or list-of-str field of a job."""
    found = []
    sections = typing.get_type_hints(JobConfig)
    for section in dataclasses.fields(JobConfig):
        cls = sections[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        for name, hint in typing.get_type_hints(cls).items():
            if hint is str or (typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is str):
                found.append(f"{section.name}.{name}")
    return found


def test_every_text_field_is_a_path_the_app_checks_or_a_known_text():
    marked = {d for marker in (READS, WRITES, BASE) for d in marked_fields(marker)}
    unclassified = sorted(set(text_fields()) - marked - NOT_PATHS)
    assert not unclassified, (f"{unclassified}: declare each as ReadPath / WritePath in "
                              "sd_lora/config.py (the app then checks it), or add it to NOT_PATHS")
    assert set(marked_fields(READS)) >= {"data.path", "data.regularization", "data.mask_path",
                                         "data.validation_path", "data.dataset_config",
                                         "report.heldout", "report.off_style"}
    assert set(marked_fields(WRITES)) == {"data.cache_dir", "train.output_dir"}
    assert marked_fields(BASE) == ["model.base"] and marked_fields(UNPICKLES) == ["model.allow_pickle"]


@pytest.fixture
def space(tmp_path) -> Workspace:
    (tmp_path / "models").mkdir()
    (tmp_path / "pictures" / "cats").mkdir(parents=True)
    space = Workspace.create(tmp_path / "adapters", models=tmp_path / "models",
                             datasets=tmp_path / "pictures")
    shutil.copytree(REPO / "datasets" / "sample_stripes", space.runs / "uploads" / "stripes")
    (tmp_path / "outside").mkdir()
    return space


def job(space: Workspace, *overrides: str, data: Path | None = None):
    data = data or space.runs / "uploads" / "stripes"
    toml = preset_toml("quick", "tiny", data, "x", list(overrides))
    return JobManager(space).job_config(toml, data, "x")


def refusal(space: Workspace, *overrides: str) -> str:
    with pytest.raises(JobRefused) as info:
        job(space, *overrides)
    return str(info.value)


def test_relative_paths_are_taken_from_the_runs_folder_and_written_absolute(space):
    inside = space.runs / "uploads" / "stripes"
    config = job(space, 'data.regularization="uploads/stripes"', 'data.cache_dir="caches/a"',
                 f'data.validation_path="{space.datasets / "cats"}"', 'data.mask_path="./uploads/../uploads"',
                 "data.masked_loss=true")
    assert config.data.regularization == str(inside)
    assert config.data.cache_dir == str(space.runs / "caches" / "a")
    assert config.data.validation_path == str(space.datasets / "cats")
    assert config.data.mask_path == str(space.runs / "uploads")
    assert config.data.path == str(inside) and config.train.output_dir == str(space.runs)
    assert (config.data.dataset_config, config.report.heldout) == ("", "")  # unset stays unset


def test_paths_leaving_the_folders_are_refused_and_say_nothing_of_what_is_there(space, tmp_path):
    (space.runs / "link").symlink_to(tmp_path / "outside")
    cases = {
        "data.regularization": f'"{tmp_path / "outside"}"',
        "data.validation_path": '"../outside"',  # from runs/: the text alone leaves it
        "report.heldout": '"link"',  # a symlink inside that leads out
        "report.off_style": '"uploads/../../outside"',
        "data.cache_dir": f'"{space.datasets / "cats"}"',  # inside, but the job writes there
        "data.dataset_config": '"/etc/passwd"',
    }
    for dotted, value in cases.items():
        message = refusal(space, f"{dotted}={value}")
        assert message.startswith(f"{dotted} = ") and "is outside the app's folders" in message
    writes = refusal(space, f'data.cache_dir="{space.models}"')
    assert f"writes only inside the runs folder {space.runs}" in writes
    # An existing folder and a missing one get the same words.
    there = refusal(space, f'data.regularization="{tmp_path / "outside"}"')
    missing = refusal(space, f'data.regularization="{tmp_path / "absent"}"')
    assert there.replace(str(tmp_path / "outside"), "X") == missing.replace(str(tmp_path / "absent"), "X")


def test_a_dataset_config_inside_must_keep_its_image_folders_inside(space, tmp_path):
    toml = space.runs / "uploads" / "sets.toml"
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "stripes"\n')
    config = job(space, f'data.dataset_config="{toml}"')
    assert config.data.dataset_config == str(toml)
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "stripes"\n'
                    f'[[datasets.subsets]]\nimage_dir = {json.dumps(str(tmp_path / "outside"))}\n')
    message = refusal(space, 'data.dataset_config="uploads/sets.toml"')
    assert message.startswith("data.dataset_config: the image_dir of subset #2 in ")
    assert "is outside the app's folders" in message and str(tmp_path / "outside") not in message


def test_the_report_looks_for_its_default_folders_inside_only(space, tmp_path):
    # datasets/cats with pictures/heldout/cats beside it: found, and written into the job.
    (space.datasets / "heldout" / "cats").mkdir(parents=True)
    config = job(space, data=space.datasets / "cats")
    assert config.report.heldout == str(space.datasets / "heldout" / "cats")
    assert config.report.off_style == "" and config.report.look_beside_data is False
    # The datasets folder itself: its "beside" is outside the app's folders, so nothing there is
    # used (the trainer is told not to look either).
    (tmp_path / "heldout" / "pictures").mkdir(parents=True)
    (tmp_path / "heldout" / "plain").mkdir()
    config = job(space, data=space.datasets)
    assert (config.report.heldout, config.report.off_style) == ("", "")
    assert config.report.look_beside_data is False


def test_jobs_that_would_open_a_pickle_are_refused(space):
    (space.models / "old.ckpt").write_bytes(b"never opened")
    message = refusal(space, "model.allow_pickle=true", 'model.base="old.ckpt"')
    assert message.startswith("model.allow_pickle = true: the app never opens pickles")


def test_a_base_is_a_builtin_a_model_inside_models_or_a_hub_id_never_read_from_disk(space):
    (space.models / "mine").mkdir()
    assert job(space, 'model.base="mine"').model.base == str(space.models / "mine")
    assert job(space, 'model.base="acme/sd"').model.base == "hf://acme/sd"
    assert job(space, 'model.base="tiny"').model.base == "tiny"


def test_hf_prefix_never_loads_a_local_folder_of_that_name(tmp_path, tiny_pipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_pipe.save_pretrained(tmp_path / "acme" / "tiny-sd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_pipeline("acme/tiny-sd").unet is not None  # the command line: a local path first
    with pytest.raises(BaseModelError) as there:
        load_pipeline("hf://acme/tiny-sd")
    with pytest.raises(BaseModelError) as absent:
        load_pipeline("hf://acme/absent")
    assert "hub id 'hf://acme/tiny-sd' is not (fully) in the Hugging Face cache" in str(there.value)
    assert str(there.value).replace("tiny-sd", "X") == str(absent.value).replace("absent", "X")
