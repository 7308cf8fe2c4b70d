"""Checkpoints restore every piece of training state, are written atomically, and are pruned."""

from __future__ import annotations

import random

import pytest
import torch
from diffusers.optimization import get_scheduler

from sd_lora.train.checkpoint import (
    Progress,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def _setup(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen base: not in the checkpoint
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    return {"unet": model}, optimizer, scheduler


def _steps(models, optimizer, scheduler, generator, n):
    for _ in range(n):
        x = torch.randn(5, 3, generator=generator)
        loss = models["unet"](x).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_resume_continues_exactly(tmp_path):
    models, optimizer, scheduler = _setup(0)
    generator = torch.Generator().manual_seed(7)
    _steps(models, optimizer, scheduler, generator, 3)
    folder = save_checkpoint(checkpoint_path(tmp_path, 3), models, optimizer, scheduler,
                             Progress(3, 1, 2), generator)
    expected_python = random.random()
    _steps(models, optimizer, scheduler, generator, 4)
    expected = [p.detach().clone() for p in models["unet"].parameters()]

    # Same frozen base (that is the base loader's job), but trainable weights, optimizer moments,
    # schedule position and RNG all start elsewhere: everything else must come from disk.
    fresh, fresh_opt, fresh_sched = _setup(0)
    with torch.no_grad():
        fresh["unet"][1].weight.add_(1.0)
    fresh_gen = torch.Generator().manual_seed(99)
    random.seed(12345)
    progress = load_checkpoint(folder, fresh, fresh_opt, fresh_sched, fresh_gen)
    assert progress == Progress(3, 1, 2)
    assert random.random() == expected_python
    _steps(fresh, fresh_opt, fresh_sched, fresh_gen, 4)
    for got, want in zip(fresh["unet"].parameters(), expected):
        assert torch.equal(got, want)
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()


def test_checkpoint_mismatch_is_an_error(tmp_path):
    models, optimizer, scheduler = _setup(0)
    generator = torch.Generator()
    folder = save_checkpoint(checkpoint_path(tmp_path, 1), models, optimizer, scheduler,
                             Progress(1, 0, 1), generator)
    other = {"text_encoder": models["unet"]}
    with pytest.raises(ValueError, match="does not match this run's LoRA layers"):
        load_checkpoint(folder, other, optimizer, scheduler, generator)


def test_listing_ignores_temporary_folders_and_prunes_oldest(tmp_path):
    models, optimizer, scheduler = _setup(0)
    generator = torch.Generator()
    for step in (5, 10, 15):
        save_checkpoint(checkpoint_path(tmp_path, step), models, optimizer, scheduler,
                        Progress(step, 0, step), generator)
    (tmp_path / "checkpoint-000020.tmp").mkdir()  # a write that crashed half-way
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-000005", "checkpoint-000010", "checkpoint-000015"]
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000010", "checkpoint-000015"]


def test_a_save_killed_half_way_leaves_a_temporary_folder_the_next_start_removes(tmp_path):
    from sd_lora.train.checkpoint import remove_incomplete

    models, optimizer, scheduler = _setup(0)
    save_checkpoint(checkpoint_path(tmp_path, 5), models, optimizer, scheduler,
                    Progress(5, 0, 5), torch.Generator())
    killed = tmp_path / ".checkpoint-000010.abc123.tmp"  # what atomic_folder leaves on SIGKILL
    killed.mkdir()
    (killed / "lora.safetensors").write_bytes(b"half")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000005"]
    assert remove_incomplete(tmp_path) == [killed] and not killed.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-000005"]
