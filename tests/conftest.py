"""Shared fixtures: tiny offline models built from configs, on the CPU."""

from __future__ import annotations

import pytest
import torch

from sd_lora.models.builtin.tiny import build_tiny_pipeline


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
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
