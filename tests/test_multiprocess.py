"""Several processes: 2 CPU processes (torch.distributed with gloo) of batch 2 end at the adapter
that 1 process of batch 4 reaches, with and without aspect-ratio buckets (SD 1.x and SD3), and
only the main process writes the run folder.

How the processes start: `accelerate launch --multi_gpu --num_processes 2` with
ACCELERATE_USE_CPU=1 (the plain run), and `torchrun --nproc_per_node 2` (the bucketed run), the
two launchers users have. (Accelerate 1.15's `accelerate launch --num_processes 2 --cpu` starts
a single process unless mpirun is set up: its CPU path is the simple launcher.) Without
ACCELERATE_USE_CPU, Accelerate on a machine without GPUs makes each launched process a lone
one; sd-lora refuses that (each would train the whole run into the same folder).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def run(out: Path, processes: int, batch: int, *extra: str, data: Path = SAMPLE_DATA,
        launcher: list[str] = TORCHRUN, cpu: bool = True, base: str = "tiny") -> subprocess.CompletedProcess:
    args = ["train", "--data", str(data), "--base", base, "--output", str(out),
            "--name", "t", "--max-steps", "4", "--no-progress", "--set", "sample.every=0",
            "--set", "sample.steps=2", "--set", "report.enabled=false",
            "--set", "train.checkpoint_every=2", "--set", 'export.dtype="fp32"',
            "--set", "train.learning_rate=1e-3", "--set", f"train.batch_size={batch}",
            "--set", "data.random_flip=true", *extra]
    command = [*launcher, str(processes), "-m", "sd_lora"] if processes > 1 else \
        [sys.executable, "-m", "sd_lora"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return subprocess.run(command + args, capture_output=True, text=True, env=env, timeout=600)


def trained(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def losses(out: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader((out / "loss.csv").open())]


@pytest.mark.slow
def test_two_processes_end_at_the_single_process_adapter(tmp_path):
    two = trained(run(tmp_path / "two", processes=2, batch=2, launcher=ACCELERATE))
    trained(run(tmp_path / "one", processes=1, batch=4))
    assert "training on 2 processes (MULTI_CPU); global batch 4" in two
    assert two.count("trained 4 steps") == 1 and two.count("Dataset ") == 1  # the main one reports
    # The same images, noise and timesteps at every step (shared draws, see objective._rows):
    # the losses agree to the digits the log keeps.
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=2e-6)
    a, b = load_file(tmp_path / "two" / "t.safetensors"), load_file(tmp_path / "one" / "t.safetensors")
    assert a.keys() == b.keys()
    ups = [k for k in a if k.endswith("lora_up.weight")]
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in ups) ** 0.5
    size = sum(float((b[k] ** 2).sum()) for k in ups) ** 0.5
    # Gradients are averaged across processes in another order of float additions; AdamW
    # magnifies those last-bit differences where gradients are tiny. Measured: 5e-5.
    assert size > 0 and diff / size < 1e-3, diff / size
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert [p.name for p in sorted((tmp_path / "two").glob("checkpoint-*"))] == [
        "checkpoint-000002", "checkpoint-000004"]


def relative_difference(a: dict, b: dict) -> float:
    ups = [k for k in a if k.endswith("lora_up.weight")]
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in ups) ** 0.5
    return diff / sum(float((b[k] ** 2).sum()) for k in ups) ** 0.5


def test_bucket_batches_are_laid_out_per_process():
    from sd_lora.data.buckets import BucketBatchSampler

    sizes = [(64, 48)] * 8 + [(48, 64)] * 4 + [(56, 56)] * 5
    one = list(BucketBatchSampler(sizes, batch_size=4, seed=2))
    two = list(BucketBatchSampler(sizes, batch_size=2, seed=2, processes=2))
    # Process i takes every second batch: together they are the single process's batches,
    # each global batch from one bucket; the 5th square image cannot feed both processes.
    pairs = [two[i] + two[i + 1] for i in range(0, len(two), 2)]
    assert pairs == [b for b in one if len(b) >= 2]
    assert all(len({sizes[j] for j in batch}) == 1 for batch in two)


@pytest.mark.slow
def test_two_bucketed_processes_end_at_the_single_process_adapter(tmp_path):
    """On SD3 (tiny-sd3): its rectified-flow draws are shared across processes as the UNet
    families' are (the plain test above covers a UNet base)."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i, size in enumerate([(96, 64)] * 8 + [(64, 96)] * 4 + [(64, 64)] * 4):  # multiples of 4
        Image.new("RGB", size, (15 * i, 100, 200 - 10 * i)).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(f"shape {i % 3}")
    buckets = ("--set", "data.enable_bucket=true", "--set", "data.bucket_reso_steps=8")
    trained(run(tmp_path / "two", 2, 2, *buckets, data=data, base="tiny-sd3"))
    trained(run(tmp_path / "one", 1, 4, *buckets, data=data, base="tiny-sd3"))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=2e-6)
    a, b = load_file(tmp_path / "two" / "t.safetensors"), load_file(tmp_path / "one" / "t.safetensors")
    assert relative_difference(a, b) < 1e-3


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="with GPUs Accelerate runs them")
def test_processes_that_accelerate_sets_up_alone_are_refused(tmp_path):
    """`accelerate launch --multi_gpu` on a machine without GPUs and without ACCELERATE_USE_CPU:
    each process would be a lone one training the whole run; both stop, naming the fix."""
    done = run(tmp_path / "lone", 2, 2, launcher=ACCELERATE, cpu=False)
    assert done.returncode != 0
    assert "process 0 of 2 (WORLD_SIZE)" in done.stderr and "process 1 of 2" in done.stderr
    assert "set ACCELERATE_USE_CPU=1" in done.stderr
    assert not (tmp_path / "lone" / "checkpoint-000002").exists()
