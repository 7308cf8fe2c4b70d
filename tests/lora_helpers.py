"""Test adapters: LoRA starts with lora_B = 0 (no effect), so tests fill it at random to make
every adapted layer change the output."""

from __future__ import annotations

import os

import pytest
import torch

# The torch threads a test may compute on: one under pytest-xdist (`make test` runs a worker
# per core, and more threads than cores make OpenMP's waiting threads stall each other: a toy
# render measured 40x slower), else two.
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


def fill_lora_B(models, seed: int = 0, scale: float = 0.1) -> None:
    """Give every lora_B in `models` random values (reproducible from `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    for model in models:
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * scale


def train_keeping_loop(config):
    """`train(config)`, and the TrainingLoop that ran (its pipe still holds the trained LoRA
    layers, its optimizer the parameter groups)."""
    from sd_lora.train.recipe import TrainingLoop, train

    kept = {}
    original = TrainingLoop.run

    def run(self, *args, **kwargs):
        kept["loop"] = self
        return original(self, *args, **kwargs)

    TrainingLoop.run = run
    try:
        result = train(config, show_progress=False)
    finally:
        TrainingLoop.run = original
    return result, kept["loop"]


def interrupt_at(step: int, monkeypatch) -> None:
    """Simulate Ctrl-C right after optimizer step `step` (the loop then saves a checkpoint)."""
    from sd_lora.train.recipe import TrainingLoop

    original = TrainingLoop.after_step

    def after_step(self, progress):
        original(self, progress)
        if progress.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingLoop, "after_step", after_step)


def killed_then_resumed(job, monkeypatch, step: int = 3):
    """`train(job)` stopped by a Ctrl-C right after optimizer step `step` (a checkpoint is saved
    there), then the same job resumed; returns the resumed run's TrainResult."""
    from sd_lora.train.recipe import train

    interrupt_at(step, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(job, show_progress=False)
    monkeypatch.undo()
    return train(job, resume=True, show_progress=False)
