"""The app reads and writes only in the folders it is given, through gradio_client against the
running app: job settings that point outside, a base named like a local path, a job that would
open a pickle, and the files that starting the app makes. The check itself, field by field:
tests/test_job_guard.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd_lora.config import READS, WRITES, marked_fields
from sd_lora.services.jobs import preset_toml
from tests.app_helpers import free_port, make_workspace, running_app
from tests.test_app_client import AppError, form, gradio_client

REPO = Path(__file__).resolve().parents[1]
APP_SET = {"data.path", "train.output_dir"}  # set by the app itself, whatever the TOML says
NEEDS = {"data.mask_path": ["data.masked_loss=true"]}  # settings a field is valid only with


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """As in test_app_client: the app on a workspace with a small dataset in runs/datasets/."""
    root = tmp_path_factory.mktemp("app")
    paths = make_workspace(root)
    with running_app(root) as (url, workspace):
        yield gradio_client.Client(url, verbose=False), workspace, paths


def job(dotted_values: dict, name: str = "escape") -> str:
    overrides = [f"{d}={json.dumps(v)}" for d, v in dotted_values.items()]
    overrides += [extra for d in dotted_values for extra in NEEDS.get(d, [])]
    return preset_toml("quick", "tiny", "", name, ["train.max_steps=2", *overrides])


def outside_folder(tmp_path: Path, paths: dict) -> Path:
    """A folder of captioned images outside the workspace: what an escape would read."""
    outside = tmp_path / "outside"
    shutil.copytree(paths["data"], outside)
    return outside


def listing(folder: Path, caches: bool = True) -> list[str]:
    """Every file and folder under `folder`; caches=False leaves out the hidden ones at the top
    (the app's runs/.gradio and runs/.tmp, which each request may add to)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if caches or not p.relative_to(folder).parts[0].startswith("."))


@pytest.mark.parametrize("dotted", sorted(set(marked_fields(READS) + marked_fields(WRITES)) - APP_SET))
def test_every_path_field_pointing_outside_is_refused_naming_it(app, tmp_path, dotted):
    client, workspace, paths = app
    outside = outside_folder(tmp_path, paths)
    before, runs = listing(outside), listing(workspace.runs, caches=False)
    with pytest.raises(AppError, match=rf"{dotted} = .* is outside the app's folders"):
        client.predict("datasets/stripes", job({dotted: str(outside)}), "escape",
                       api_name="/train_start")
    assert listing(outside) == before and listing(workspace.runs, caches=False) == runs  # no job


def test_a_dataset_config_inside_with_image_folders_outside_is_refused(app, tmp_path):
    client, workspace, paths = app
    outside = outside_folder(tmp_path, paths)
    sets = workspace.runs / "datasets" / "sets.toml"
    sets.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = {json.dumps(str(outside))}\n")
    try:
        with pytest.raises(AppError, match=r"data.dataset_config: the image_dir of subset #1 .* is outside the app"):
            client.predict("datasets/stripes", job({"data.dataset_config": "datasets/sets.toml"}),
                           "escape", api_name="/train_start")
    finally:
        sets.unlink()


def test_a_job_that_would_open_a_pickle_is_refused(app):
    client, workspace, _ = app
    checkpoint = workspace.models / "old.ckpt"
    checkpoint.write_bytes(b"never opened")
    try:
        toml = job({"model.allow_pickle": True, "model.base": "old.ckpt"})
        with pytest.raises(AppError, match="model.allow_pickle = true: the app never opens pickles"):
            client.predict("datasets/stripes", toml, "escape", api_name="/train_start")
    finally:
        checkpoint.unlink()


def test_a_base_named_like_a_local_path_is_a_hub_id_never_read_from_disk(app, tmp_path, tiny_pipe,
                                                                          monkeypatch):
    """`outside/mymodel` exists in the app's working directory (outside --models): the app
    treats the name as a hub id only, and says the same as for a name that exists nowhere."""
    client, _, _ = app
    monkeypatch.chdir(tmp_path)
    tiny_pipe.save_pretrained(tmp_path / "outside" / "mymodel")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    messages = {}
    for name in ("mymodel", "nothere"):
        with pytest.raises(AppError) as refused:
            client.predict(*form(base=f"outside/{name}"), api_name="/generate")
        messages[name] = str(refused.value).replace(name, "NAME")
    assert "hub id 'hf://outside/NAME' is not (fully) in the Hugging Face cache" in messages["mymodel"]
    assert messages["mymodel"] == messages["nothere"]
    # The Train tab's plan reads the base's size from its files: never from a folder outside.
    report, _ = client.predict("datasets/stripes", job({"model.base": "outside/mymodel"}),
                               api_name="/dataset")
    assert "Plan: base hf://outside/mymodel (" in report
    absolute = str(tmp_path / "outside" / "mymodel")
    report, _ = client.predict("datasets/stripes", job({"model.base": absolute}), api_name="/dataset")
    assert "Plan:" not in report and absolute not in report


def test_starting_the_app_writes_nothing_outside_its_folders(tmp_path):
    """`python -m sd_lora_app` with the system temp folder, HOME and the working directory each an
    empty folder of their own: after starting and one generation, all three are still empty."""
    root, watched = tmp_path / "app", {name: tmp_path / name for name in ("tmp", "home", "cwd")}
    for folder in [root / "models", *watched.values()]:
        folder.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GRADIO_", "HF_", "XDG_", "TORCHINDUCTOR_", "TMP", "TEMP", "MPL"))}
    env.update(TMPDIR=str(watched["tmp"]), HOME=str(watched["home"]), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    port = free_port()
    command = [sys.executable, "-m", "sd_lora_app", "--adapters", str(root / "adapters"),
               "--models", str(root / "models"), "--port", str(port)]
    with open(tmp_path / "app.log", "wb") as log:
        process = subprocess.Popen(command, cwd=watched["cwd"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        client = connect(f"http://127.0.0.1:{port}/", process, tmp_path / "app.log")
        gallery, _, selected, *_ = client.predict(*form(steps=2), api_name="/generate")
        assert len(gallery) == 1 and (root / "outputs" / selected).is_file()
    finally:
        process.terminate()
        process.wait(timeout=60)
    for name, folder in watched.items():
        assert listing(folder) == [], f"starting the app wrote into {name}: {listing(folder)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app", "app.log", "cwd", "home", "tmp"]


def connect(url: str, process: subprocess.Popen, log: Path, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the app exited: {log.read_text(errors='replace')[-2000:]}"
        try:
            return gradio_client.Client(url, verbose=False)
        except Exception:  # not serving yet
            time.sleep(1)
    raise AssertionError(f"the app did not answer in {timeout} s: {log.read_text()[-2000:]}")
