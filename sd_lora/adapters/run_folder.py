"""What the files of a training run's folder are: its adapter, or a training checkpoint's state.

A checkpoint folder (`checkpoint-000200/`) holds LoRA parameters under training names beside the
optimizer and RNG state: what `--resume` reads, not an adapter any tool loads. Generation, the
app and `inspect` ask here so that they can say so and name the run's adapter instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{6,})$")


def checkpoint_config(folder: Path) -> dict | None:
    """The flat config the checkpoint was made with (None for checkpoints from before it was
    recorded)."""
    return json.loads((folder / "state.json").read_text()).get("config")


def training_checkpoint_of(path: Path) -> Path | None:
    """The training checkpoint folder `path` is (or is a file of), else None. Its
    `lora.safetensors` holds LoRA parameters under training names, beside the optimizer and
    RNG state: what `--resume` reads, not an adapter any tool loads."""
    path = Path(path)
    for folder in (path, path.parent):
        if CHECKPOINT_RE.match(folder.name) and (folder / "state.json").is_file():
            return folder
    return None


def run_adapter_of(checkpoint: Path) -> Path:
    """The adapter file of the run that wrote `checkpoint`: `<run>/<train.name>.safetensors`
    (or its diffusers export when only that was written). It may not exist yet: the run
    writes it when it finishes."""
    try:
        name = (checkpoint_config(checkpoint) or {}).get("train.name")
    except (OSError, ValueError):  # an unreadable state.json: the folder still tells the run
        name = None
    run = checkpoint.parent
    kohya = run / f"{name or run.name}.safetensors"
    diffusers = run / f"{name or run.name}-diffusers" / "pytorch_lora_weights.safetensors"
    return diffusers if diffusers.is_file() and not kohya.is_file() else kohya


def not_an_adapter(path: Path, name_of=str) -> str | None:
    """Why `path` cannot be used as an adapter when it belongs to a training checkpoint (None
    when it does not); the run's adapter is shown as `name_of(its path)` (the app: its name)."""
    checkpoint = training_checkpoint_of(path)
    if checkpoint is None:
        return None
    adapter = run_adapter_of(checkpoint)
    later = "" if adapter.is_file() else (
        " (the run writes it when it finishes; `sd-lora train ... --resume` continues it)")
    return (f"this is a training checkpoint ({checkpoint.name}: LoRA, optimizer and RNG state for "
            f"--resume), not an adapter; its adapter is {name_of(adapter)}{later}")
