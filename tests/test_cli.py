"""The command line as a user runs it: train -> generate -> inspect, and bad input that names the
file or field and never costs a checkpoint."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from PIL import Image

from sd_lora.cli.main import main

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"
FAST = ["--base", "tiny", "--set", "sample.steps=2", "--set", "train.batch_size=2", "--no-progress"]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short CLI run with a checkpoint, shared by the tests below (they must not change it)."""
    out = tmp_path_factory.mktemp("run")
    data = tmp_path_factory.mktemp("data") / "set"
    shutil.copytree(SAMPLE_DATA, data)
    (data / "broken.png").write_bytes(b"this is not a PNG")  # must be skipped, not fatal
    code = main(["train", "--data", str(data), "--base", "tiny", "--output", str(out),
                 "--name", "demo", "--max-steps", "3", *FAST])
    assert code == 0
    return out, data


@pytest.mark.slow
def test_train_generate_inspect(trained_run, tmp_path, capsys):
    out, _ = trained_run
    adapter = out / "demo.safetensors"
    assert adapter.is_file() and (out / "checkpoint-000003").is_dir()
    report = (out / "dataset_report.txt").read_text()
    assert "broken.png" in report  # the skipped file and its reason are listed

    image = tmp_path / "out.png"
    assert main(["generate", "--base", "tiny", "--lora", f"{adapter}:0.8", "--prompt",
                 "zkstripes, a red circle", "--seed", "1", "--steps", "3", "--output",
                 str(image)]) == 0
    parameters = Image.open(image).text["parameters"]
    assert "zkstripes, a red circle <lora:demo:0.8>" in parameters
    assert "Seed: 1" in parameters and "Steps: 3" in parameters and "Lora hashes" in parameters

    plain = tmp_path / "plain.png"
    main(["generate", "--base", "tiny", "--prompt", "zkstripes, a red circle", "--seed", "1",
          "--steps", "3", "--output", str(plain)])
    assert Image.open(plain).tobytes() != Image.open(image).tobytes(), "adapter had no effect"

    capsys.readouterr()
    assert main(["inspect", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "format: kohya" in text and "family: sd1" in text and "(agrees)" in text


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--base", "no-such-base"], "no-such-base"),
        (["--set", "train.lerning_rate=1e-4"], "train.lerning_rate"),
        (["--set", 'train.max_steps="many"'], "train.max_steps must be int"),
        (["--data", "{empty}"], "{empty}"),
        (["--data", "{missing}"], "{missing}"),
        (["--set", "train.learning_rate=3e-3"], "train.learning_rate: 0.0001 -> 0.003"),
        (["--set", "lora.unet_r=4"], "lora.unet_r: 8 -> 4"),
    ],
)
def test_bad_input_names_the_problem_and_keeps_the_checkpoint(
    trained_run, tmp_path, capsys, args, message
):
    out, data = trained_run
    empty = tmp_path / "empty"
    empty.mkdir()
    subst = {"{empty}": str(empty), "{missing}": str(tmp_path / "missing")}
    args = [subst.get(a, a) for a in args]
    before = tree_digest(out)
    code = main(["train", "--data", str(data), "--output", str(out), "--name", "demo",
                 "--max-steps", "6", "--resume", *FAST, *args])
    assert code == 2
    assert subst.get(message, message) in capsys.readouterr().err
    assert tree_digest(out) == before  # nothing in the run folder changed


@pytest.mark.slow
def test_fresh_run_refuses_to_overwrite_checkpoints(trained_run, capsys):
    out, data = trained_run
    before = tree_digest(out)
    code = main(["train", "--data", str(data), "--output", str(out), "--max-steps", "3", *FAST])
    assert code == 2
    assert "already holds checkpoint-000003; pass --resume" in capsys.readouterr().err
    assert tree_digest(out) == before


def test_fp16_on_cpu_is_refused_with_the_fix(tmp_path, capsys):
    code = main(["train", "--data", str(SAMPLE_DATA), "--output", str(tmp_path / "r"),
                 "--mixed-precision", "fp16", *FAST])
    assert code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_lora_argument_parsing():
    from sd_lora.generate.images import parse_adapter_choice

    a = parse_adapter_choice("C:/loras/ink.safetensors:0.5:0.8")  # a ':' inside the path
    assert str(a.adapter) == "C:/loras/ink.safetensors"
    assert (a.text_encoder, a.unet) == (0.5, 0.8)  # A1111 order: te, unet
    b = parse_adapter_choice("ink.safetensors:-0.3")
    assert (b.text_encoder, b.unet) == (-0.3, -0.3)
    assert parse_adapter_choice("ink.safetensors").unet == 1.0


def test_check_reports_every_problem_and_the_plan_before_any_model_loads(tmp_path, capsys,
                                                                         monkeypatch):
    import json

    import sd_lora.models.load as models

    def no_loading(*args, **kwargs):
        raise AssertionError("check must not load a model")

    monkeypatch.setattr(models, "load_pipeline", no_loading)
    assert main(["check", str(SAMPLE_DATA), "--set", "train.max_steps=40",
                 "--set", "train.batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "16 images (16 items per epoch)" in out and "40 steps of 4 images: 10.0 epochs" in out
    assert "0 files skipped, 0 warnings" in out

    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DATA, data)
    (data / "broken.png").write_bytes(b"this is not a PNG")
    (data / "empty.jpg").write_bytes(b"")
    assert main(["check", str(data), "--json"]) == 1  # trainable, but files were left out
    report = json.loads(capsys.readouterr().out)
    assert report["plan"]["images"] == 16 and report["plan"]["skipped_files"] == 2
    assert {Path(e["path"]).name: e["reason"] for e in report["skipped"]}["empty.jpg"] == \
        "empty file (0 bytes)"

    demo = Path(__file__).resolve().parent.parent / "examples" / "demo.toml"
    monkeypatch.chdir(demo.parent.parent)  # the demo's paths are relative to the repository
    assert main(["check", "--config", str(demo)]) == 0
    out = capsys.readouterr().out
    assert "base toy (the built-in toy-world model, 64 px)" in out
    # Regularization: what each folder adds to an epoch, not "among them" (they are added).
    assert ("32 images + 32 regularization images (64 items per epoch: 32 training, "
            "32 regularization)") in out


@pytest.mark.parametrize("args, message", [
    (["{empty}"], "no usable images in dataset folder"),
    (["{missing}"], "does not exist"),
    ([str(SAMPLE_DATA), "--set", 'model.base="models/nope.safetensors"'], "no such file"),
    ([str(SAMPLE_DATA), "--set", "train.batch_size=0"], "train.batch_size = 0 must be positive"),
    ([str(SAMPLE_DATA), "--set", "data.colour=1"], "unknown config key 'data.colour'"),
])
def test_check_refuses_an_impossible_job_naming_why(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    subst = {"{empty}": str(tmp_path / "empty"), "{missing}": str(tmp_path / "missing")}
    assert main(["check", *[subst.get(a, a) for a in args]]) == 2
    assert message in capsys.readouterr().err
