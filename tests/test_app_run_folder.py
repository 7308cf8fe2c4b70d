"""The app opened on a training run folder, as `sd-lora train` and `make demo` print it
(`sd-lora app --adapters runs/demo`): the run's adapter listed and its checkpoint files not, a
checkpoint file chosen by name refused naming the adapter, the app's own files kept inside the
run folder, and start-up lines in the command's words. Through gradio_client, against the app
running in-process on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import io

import pytest

from tests.app_helpers import PROMPT, running_app
from tests.test_app_client import component, form
from tests.test_cli_usage import fake_run

gradio_client = pytest.importorskip("gradio_client")
AppError = gradio_client.exceptions.AppError
CHECKPOINT_LORA = "checkpoint-000200/lora"


@pytest.fixture(scope="module")
def run_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    (root / "models").mkdir()
    run = root / "runs" / "demo"
    fake_run(run)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), running_app(root, adapters=run, quiet=False) as (
            url, workspace):
        client = gradio_client.Client(url, verbose=False)
        yield client, workspace, root, printed.getvalue()


def test_the_run_adapter_is_listed_and_its_checkpoint_files_are_not(run_app):
    client, _, _, _ = run_app
    slot = component(client, "lora-0-name")
    assert [value for _, value in slot["choices"]] == ["", "demo"]
    xy = component(client, "xy-adapter")
    assert [value for _, value in xy["choices"]] == ["demo"]
    assert xy["value"] == "demo"  # the X/Y grid's default is the run's adapter


def test_a_checkpoint_file_chosen_by_name_names_the_run_adapter(run_app):
    client, _, _, _ = run_app
    message = r"this is a training checkpoint .*; its adapter is demo\.safetensors"
    info, _ = client.predict(CHECKPOINT_LORA, api_name="/adapter_info")
    assert "this is a training checkpoint" in info and "its adapter is demo.safetensors" in info
    values = form((CHECKPOINT_LORA, 1.0, 1.0))
    with pytest.raises(AppError, match=message):
        client.predict(*values, api_name="/generate")
    with pytest.raises(AppError, match=message):
        client.predict(CHECKPOINT_LORA, "0, 1", "1", *form(), api_name="/xy_grid")


def test_the_app_writes_inside_the_run_folder_only(run_app):
    client, workspace, root, _ = run_app
    run = root / "runs" / "demo"
    assert (workspace.outputs, workspace.runs) == (run / "app" / "outputs", run / "app" / "runs")
    _, _, selected, *_ = client.predict(*form(("demo", 0.5, 0.5)), api_name="/generate")
    assert (workspace.outputs / selected).is_file()
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["demo"]  # nothing beside it
    assert sorted(p.name for p in root.iterdir()) == ["models", "runs"]
    assert PROMPT in (workspace.outputs / selected).read_bytes().decode("latin-1")


def test_start_up_lines_speak_of_the_commands_flags(run_app):
    client, _, _, printed = run_app
    assert client.src.rstrip("/") in printed and "--share" in printed
    assert "share=True" not in printed and "launch()" not in printed
