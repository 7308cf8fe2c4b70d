"""Shared fixtures: tiny offline models built from configs, on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist (`make test` runs one worker per core) each worker, and every process it
# starts, computes on one thread: two workers of two threads on two cores would fight.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from sd_lora.models.builtin.tiny import build_tiny_pipeline


def _has_cuda() -> bool:
    return torch.cuda.is_available()


# The longest test files (toy-world trainings, the notebook, the browser, the GPU check's dry run) go first,
# so that under pytest-xdist they start on different workers and the short ones fill in around
# them, instead of one of them starting last and running alone.
LONGEST_FIRST = ("test_toy_world.py", "test_notebook.py", "test_app_browser.py", "test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep order
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_pipe():
    """A fresh tiny SD1-topology pipeline (deterministic weights; safe to modify)."""
    pipe = build_tiny_pipeline(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        getattr(pipe, name).requires_grad_(False).eval()
    return pipe
