"""A full disk while saving: a clear error naming the file and the last good checkpoint, which
is intact, and nothing half-written left behind. Once with a real full disk (a small tmpfs,
where this machine lets us mount one), once with ENOSPC raised where the bytes are written."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sd_lora.train.checkpoint as checkpoint_module
import sd_lora.train.loop as train_module  # the step loop: where checkpoints are saved
from sd_lora.train.checkpoint import CheckpointWriteError
from sd_lora.train.recipe import train
from tests.test_train import job


def fill(folder) -> None:
    """Write zeros into `folder` until the disk refuses."""
    with open(folder / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (64 << 10))
                handle.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    # Leave a little room, as a real disk that fills up slowly would: the checkpoint still fails.


def assert_last_good_kept(out, message: str) -> None:
    assert "checkpoint-000002, is intact" in message and "--resume" in message
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-000002"]
    lora = load_file(out / "checkpoint-000002" / "lora.safetensors")
    assert lora and all(torch.isfinite(t).all() for t in lora.values())
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); "
                    "the ENOSPC test below covers the same path")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_really_full_disk_stops_the_run_with_the_last_checkpoint_intact(small_disk, monkeypatch):
    out = small_disk / "run"
    real = train_module.save_checkpoint

    def save_then_fill(folder, *args, **kwargs):
        saved = real(folder, *args, **kwargs)
        if folder.name == "checkpoint-000002":
            fill(small_disk)
        return saved

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_fill)
    with pytest.raises(CheckpointWriteError, match="the disk is full") as err:
        train(job(out, "train.max_steps=6", "train.checkpoint_every=2"), show_progress=False)
    assert "checkpoint-000004" in str(err.value)
    assert_last_good_kept(out, str(err.value))


@pytest.mark.slow
def test_enospc_while_writing_a_checkpoint_or_the_export(tmp_path, monkeypatch):
    real = checkpoint_module.save_file

    def save_file(tensors, path, *args, **kwargs):
        if "checkpoint-000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    out = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match="the disk is full") as err:
        train(job(out, "train.max_steps=6", "train.checkpoint_every=2"), show_progress=False)
    assert_last_good_kept(out, str(err.value))

    # The export at the end: the final checkpoint holds the adapter, and resuming writes it.
    monkeypatch.setattr(checkpoint_module, "save_file", real)
    real_write = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(".t.safetensors."):  # the export's temporary file
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(CheckpointWriteError, match=r"t\.safetensors: the disk is full") as err:
        train(job(out, "train.max_steps=6", "train.checkpoint_every=2"), resume=True,
              show_progress=False)
    assert "checkpoint-000006, is intact" in str(err.value)
    assert not (out / "t.safetensors").exists()
    monkeypatch.setattr(Path, "write_bytes", real_write)
    result = train(job(out, "train.max_steps=6", "train.checkpoint_every=2"), resume=True,
                   show_progress=False)
    assert result.steps == 6 and (out / "t.safetensors").is_file()
