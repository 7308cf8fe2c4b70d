"""What a resumed run leaves in its folder after a kill: no temporary file of any interrupted
write, and a loss log with each step once."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sd_lora.train.recipe import train
from tests.test_train import job

STEPS = 6


def run_job(out: Path):
    return job(out, f"train.max_steps={STEPS}", "train.checkpoint_every=2",
               "train.checkpoints_keep=0", "report.enabled=false")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A whole run with checkpoints at steps 2, 4 and 6; each test works on a copy."""
    out = tmp_path_factory.mktemp("runs") / "whole"
    train(run_job(out), show_progress=False)
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def killed_while_writing(path: Path, folder: bool = False) -> None:
    """What a SIGKILL in the middle of an atomic write of `path` leaves: the writer dies inside
    `atomic_path` / `atomic_folder`, before its cleanup can run."""
    opener = "atomic_folder" if folder else "atomic_path"
    write = "(tmp / 'lora.safetensors').write_bytes(b'half')" if folder else "tmp.write_bytes(b'half')"
    code = (f"import os\nfrom sd_lora.util.atomic import {opener}\n"
            f"with {opener}({str(path)!r}) as tmp:\n    {write}\n    os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9


def test_a_resume_removes_the_temporaries_of_every_write_a_kill_interrupted(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / f"checkpoint-{STEPS:06d}")  # killed after the last step's log row
    killed_while_writing(out / "t.safetensors")  # the final export
    killed_while_writing(out / "t-diffusers" / "pytorch_lora_weights.safetensors")
    killed_while_writing(out / "samples" / "final.png")
    killed_while_writing(out / "report.json")
    killed_while_writing(out / f"checkpoint-{STEPS:06d}", folder=True)
    left = sorted(p.relative_to(out) for p in out.rglob(".*.tmp"))
    assert len(left) == 5, left
    (out / "notes.tmp").write_text("the user's")  # not named like a temporary: kept
    (out / ".draft.tmp").write_text("the user's")

    train(run_job(out), resume=True, show_progress=False)

    assert sorted(p.relative_to(out) for p in out.rglob("*.tmp")) == [
        Path(".draft.tmp"), Path("notes.tmp")]
    assert (out / "t.safetensors").is_file()


def test_a_resume_cuts_the_loss_log_back_to_its_checkpoint(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    # Killed after steps 5 and 6 were logged but before checkpoint 6 was written: the resume
    # trains 5 and 6 again from checkpoint 4.
    shutil.rmtree(out / f"checkpoint-{STEPS:06d}")
    with (out / "loss.csv").open("a") as log:
        log.write("7,0.1")  # and a row the kill cut short
    first = (out / "loss.csv").read_text().splitlines()[:5]

    train(run_job(out), resume=True, show_progress=False)

    lines = (out / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,epoch"
    assert [int(row.split(",")[0]) for row in lines[1:]] == list(range(1, STEPS + 1))
    assert lines[:5] == first  # the rows before the checkpoint are kept as they were
    assert not list(out.glob(".loss.csv.*.tmp"))
