"""Flags that used to fail after the model had loaded (a traceback, an empty run folder) or
quietly wrote nothing with exit status 0: each is refused before any model loads, in one line,
with exit status 2, and a refused start leaves no empty run folder behind."""

from __future__ import annotations

from pathlib import Path

import pytest

import sd_lora.models.load
import sd_lora.train.recipe
from sd_lora.cli.main import main

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad flag was refused")

    monkeypatch.setattr(sd_lora.models.load, "load_pipeline", refuse)
    monkeypatch.setattr(sd_lora.train.recipe, "load_training_base", refuse)


def refused_in_one_line(capsys, code: int, message: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


@pytest.mark.parametrize(("args", "message"), [
    (["--seed", "-1"], "train.seed = -1 must be from 0 to 4294967295"),
    (["--seed", "4294967296"], "train.seed = 4294967296 must be from 0 to 4294967295"),
    (["--output", "{file}"], "is a file; name a folder for the run"),
    (["--set", "sample.seeds=[1, -2]", "--set", 'sample.prompts=["a", "b"]'],
     "sample.seeds = -2 must be from 0"),
])
def test_train_refuses_before_loading_and_leaves_no_run_folder(
        tmp_path, capsys, no_model_loads, args, message):
    run = tmp_path / "runs" / "new"
    a_file = tmp_path / "taken.txt"
    a_file.write_text("not a folder")
    args = [str(a_file) if a == "{file}" else a for a in args]
    code = main(["train", "--data", str(SAMPLE_DATA), "--base", "tiny", "--output", str(run),
                 "--max-steps", "1", "--no-progress", *args])
    refused_in_one_line(capsys, code, message)
    assert a_file.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt"]  # no runs/new, no runs/


def test_a_start_refused_after_the_folder_was_made_removes_it(tmp_path, capsys, no_model_loads):
    (tmp_path / "empty").mkdir()
    run = tmp_path / "runs" / "new"
    code = main(["train", "--data", str(tmp_path / "empty"), "--base", "tiny", "--output", str(run),
                 "--no-progress"])
    assert code == 2 and "no usable images" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # A folder the user made beforehand stays, as does anything in it.
    (run / "notes").mkdir(parents=True)
    main(["train", "--data", str(tmp_path / "empty"), "--base", "tiny", "--output", str(run)])
    assert (run / "notes").is_dir()


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--steps", "-3"], "--steps -3 must be at least 1"),
    (["--width", "70"], "--width 70 must be a positive multiple of 8 (e.g. 72)"),
    (["--height", "0"], "--height 0 must be a positive multiple of 8"),
    (["--sampler", "bogus"], "--sampler: unknown sampler 'bogus'; choose one of"),
    (["--count", "0"], "--count 0 must be at least 1"),
    (["--output", "{folder}"], "is a folder; name the image file"),
    (["--seed", "-1"], "--seed -1 must be from 0 to 4294967295"),
    (["--lora", "{folder}/missing.safetensors:0.5"], "missing.safetensors:0.5: no file"),
])
def test_generate_refuses_bad_flags_before_loading(tmp_path, capsys, no_model_loads, args, message):
    folder = tmp_path / "pictures"
    folder.mkdir()
    args = [a.replace("{folder}", str(folder)) for a in args]
    code = main(["generate", "--base", "tiny", "--prompt", "a red circle",
                 "--output", str(folder / "out.png"), *args])
    refused_in_one_line(capsys, code, message)
    assert list(folder.iterdir()) == []


def test_the_app_without_gradio_says_how_to_install_it_and_makes_no_folder(tmp_path, monkeypatch,
                                                                            capsys):
    """`pip install sd-lora` (no `app` extra) trains headless; `sd-lora app` then names the fix."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["app", "--adapters", str(tmp_path / "adapters")]) == 2
    err = capsys.readouterr().err
    assert "the browser app needs gradio, which is not installed" in err
    assert "pip install 'sd-lora[app]'" in err
    assert not (tmp_path / "adapters").exists()
