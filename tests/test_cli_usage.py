"""The command line as its help and its errors describe it: every default shown, runs that
never share a folder, `--lora` forms (A1111's tag too), training checkpoints that are not
adapters, a taken `--port` in one line, and one default sampler."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from sd_lora.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = ROOT / "datasets" / "sample_stripes"
FAST = ["--base", "tiny", "--set", "sample.steps=2", "--set", "train.batch_size=2",
        "--set", "report.enabled=false", "--no-progress"]
COMMANDS = ["train", "generate", "inspect", "check", "convert", "merge", "resize", "extract", "app"]
PROMPT = "zkstripes, a red circle"


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def help_lines(name: str, capsys, monkeypatch) -> dict[str, str]:
    """{flag: its help text}, from `sd-lora NAME --help` printed wide: each flag's line, and
    the next one when a long metavar pushed the help there."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main([name, "--help"])
    found: dict[str, str] = {}
    flag = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            found[flag] = line
        elif flag is not None and line.startswith("    "):
            found[flag] += " " + line.strip()
        else:
            flag = None
    return found


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_default(name, capsys, monkeypatch):
    lines = help_lines(name, capsys, monkeypatch)
    for action in subcommand(name)._actions:
        switch = action.nargs == 0  # --help, --resume, --json ...: off unless given
        if switch or action.required or not action.option_strings:
            continue
        flag = action.option_strings[0]
        assert "default" in lines[flag], f"sd-lora {name} --help: {flag} shows no default"


def test_train_flags_show_the_config_defaults(capsys, monkeypatch):
    from sd_lora.config import JobConfig

    lines = help_lines("train", capsys, monkeypatch)
    defaults = JobConfig()
    assert f"(train.max_steps; default: {defaults.train.max_steps}" in lines["--max-steps"]
    assert f"(data.path; default: {defaults.data.path})" in lines["--data"]
    assert "runs/NAME-2" in lines["--output"] and "data folder's name" in lines["--name"]


def test_run_names_default_to_the_data_and_an_explicit_config_is_kept():
    from sd_lora.config import JobConfig, load_config
    from sd_lora.train.run_names import with_run_names

    assert (JobConfig().train.output_dir, JobConfig().train.name) == ("", "")
    demo = with_run_names(load_config(ROOT / "examples" / "demo.toml"), resume=False)
    assert (demo.train.output_dir, demo.train.name) == ("runs/demo", "demo")
    named = with_run_names(load_config(None, ['data.path="x/pastel/"']), resume=False)
    assert (named.train.output_dir, named.train.name) == (str(Path("runs/pastel")), "pastel")


@pytest.mark.slow
def test_a_run_without_output_gets_its_own_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(SAMPLE_DATA, tmp_path / "pastel")
    train = ["train", "--data", "pastel", "--max-steps", "1", *FAST]
    assert main(train) == 0
    first = tmp_path / "runs" / "pastel"
    assert (first / "pastel.safetensors").is_file() and (first / "checkpoint-000001").is_dir()
    before = tree_digest(first)
    assert main(train) == 0  # not refused for the first run's checkpoints: a folder of its own
    second = tmp_path / "runs" / "pastel-2"
    assert (second / "pastel.safetensors").is_file()
    assert "run folder: runs/pastel-2" in capsys.readouterr().out
    assert main(["train", "--data", "pastel", "--max-steps", "2", "--resume", *FAST]) == 0
    assert (second / "checkpoint-000002").is_dir()  # the latest run continued
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["pastel", "pastel-2"]
    assert tree_digest(first) == before


@pytest.mark.parametrize("text", ["file.safetensors=0.8", "file.safetensors:0,8",
                                  "<lora:demo:0.8>", "demo:0.8"])
def test_a_wrong_lora_is_not_found_and_the_forms_are_shown(text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["generate", "--base", "tiny", "--prompt", PROMPT, "--lora", text])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"--lora {text}: no file " in err and "only .safetensors" not in err
    assert "FILE, FILE:W, FILE:TE:UNET" in err and "<lora:NAME:W>" in err
    if "=" in text or "," in text:
        assert "e.g. FILE:0.8" in err


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_an_a1111_tag_names_an_adapter_in_the_current_folder(tmp_path, monkeypatch):
    from tests.app_helpers import make_adapter

    monkeypatch.chdir(tmp_path)
    make_adapter(tmp_path / "style.safetensors", 1)
    base = ["generate", "--base", "tiny", "--prompt", PROMPT, "--seed", "3", "--steps", "3"]
    for i, (tag, same) in enumerate([("<lora:style:0.8>", "style.safetensors:0.8"),
                                     ("<lora:style:0.5:-0.4>", "style.safetensors:0.5:-0.4")]):
        assert main([*base, "--lora", tag, "--output", f"tag{i}.png"]) == 0
        assert main([*base, "--lora", same, "--output", f"file{i}.png"]) == 0
        assert np.array_equal(pixels(tmp_path / f"tag{i}.png"), pixels(tmp_path / f"file{i}.png"))
    assert "<lora:style:0.5:-0.4>" in Image.open(tmp_path / "tag1.png").text["parameters"]


def fake_run(run: Path, name: str = "demo") -> Path:
    """A training run folder as `sd-lora train` leaves it, its checkpoint laid out as
    sd_lora/train/checkpoint.py writes one (tensors under training names, not an adapter's)."""
    from tests.app_helpers import make_adapter

    make_adapter(run / f"{name}.safetensors", 1)
    (run / "config.toml").write_text(f'version = 1\n[train]\nname = "{name}"\n')
    (run / "summary.json").write_text("{}")
    checkpoint = run / "checkpoint-000200"
    checkpoint.mkdir()
    lora = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight":
            torch.zeros(4, 32)}
    safetensors.torch.save_file(lora, checkpoint / "lora.safetensors")
    safetensors.torch.save_file({"__empty__": torch.zeros(0)}, checkpoint / "optimizer.safetensors")
    safetensors.torch.save_file({"torch": torch.zeros(4, dtype=torch.uint8)}, checkpoint / "rng.safetensors")
    state = {"progress": {"global_step": 200}, "config": {"train.name": name}}
    (checkpoint / "state.json").write_text(json.dumps(state))
    return checkpoint


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_a_training_checkpoint_file_is_refused_naming_the_run_adapter(command, tmp_path, capsys):
    checkpoint = fake_run(tmp_path / "runs" / "demo")
    lora = f"{checkpoint / 'lora.safetensors'}:0.8"
    args = (["generate", "--base", "tiny", "--prompt", PROMPT, "--lora", lora,
             "--output", str(tmp_path / "x.png")] if command == "generate"
            else ["merge", lora, "--out", str(tmp_path / "merged.safetensors")])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "this is a training checkpoint" in err
    assert f"its adapter is {tmp_path / 'runs' / 'demo' / 'demo.safetensors'}" in err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "merged.safetensors").exists()


def test_the_default_sampler_is_the_apps():
    from sd_lora.models.schedulers import DEFAULT_SAMPLER, sampler_name
    from sd_lora.services.session import GenerateRequest

    parsed = build_parser().parse_args(["generate", "--prompt", PROMPT])
    assert sampler_name(parsed.sampler) == DEFAULT_SAMPLER == GenerateRequest().sampler


def test_a_taken_port_is_one_line_naming_it(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "sd_lora", "app", "--adapters", str(tmp_path / "adapters"),
             "--port", str(port)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    err = done.stderr.strip()
    assert done.returncode == 2, done.stderr
    assert len(err.splitlines()) == 1 and f"--port {port} is already in use" in err
    assert "leave --port out" in err and "server_port" not in err and "Traceback" not in err
    assert not (tmp_path / "adapters").exists()  # refused before any folder was made
