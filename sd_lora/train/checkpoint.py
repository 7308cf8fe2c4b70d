"""Training checkpoints: complete or absent, and never pickled.

A checkpoint is a folder `checkpoint-000100/` holding the trainable LoRA tensors, the optimizer
moments and the RNG states as safetensors, and everything else (step, epoch, batch position,
learning-rate schedule, optimizer hyper-parameters) as JSON. It is written under a temporary name,
fsynced, then renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sd_lora.adapters.run_folder import CHECKPOINT_RE
from sd_lora.errors import UserError
from sd_lora.util.atomic import atomic_folder, leftover_temporaries

EXTRA_FILE = "extra.safetensors"  # state beside the LoRA and optimizer (the EMA)


@dataclass(frozen=True)
class Progress:
    """Where training stands: optimizer steps done, and the data position to continue from."""

    global_step: int
    epoch: int
    batches_done_in_epoch: int  # micro-batches of `epoch` already consumed


def named_trainable(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters keyed `<component>.<parameter name>`: stable across runs."""
    return {
        f"{comp}.{name}": p
        for comp, model in models.items()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def save_checkpoint(
    folder: Path,
    models: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    progress: Progress,
    noise_generator: torch.Generator,
    config: dict | None = None,  # the run's flat_config, checked when the run is resumed
    extra: dict[str, torch.Tensor] | None = None,  # more state (the EMA), read by load_extra
) -> Path:
    """Write `folder` atomically; returns it."""
    params = named_trainable(models)
    index_of = {id(p): i for i, p in enumerate(_optimizer_params(optimizer))}
    moments: dict[str, torch.Tensor] = {}
    state = optimizer.state_dict()["state"]
    for name, p in params.items():
        for key, value in state.get(index_of[id(p)], {}).items():
            moments[f"{name}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    with atomic_folder(folder) as tmp:
        _write_checkpoint_files(
            tmp, params, moments, optimizer, lr_scheduler, progress, noise_generator, config
        )
        if extra:
            save_file(extra, tmp / EXTRA_FILE)
    return folder


def load_extra(folder: Path) -> dict[str, torch.Tensor]:
    """The `extra` tensors a checkpoint was saved with ({} when none)."""
    path = folder / EXTRA_FILE
    return load_file(path) if path.is_file() else {}


def _write_checkpoint_files(
    tmp, params, moments, optimizer, lr_scheduler, progress, noise_generator, config
):
    save_file(
        {n: p.detach().cpu().contiguous() for n, p in params.items()}, tmp / "lora.safetensors"
    )
    save_file(moments or {"__empty__": torch.zeros(0)}, tmp / "optimizer.safetensors")
    save_file(_rng_tensors(noise_generator), tmp / "rng.safetensors")
    meta = {
        "progress": asdict(progress),
        "param_groups": optimizer.state_dict()["param_groups"],
        "lr_scheduler": _jsonable(lr_scheduler.state_dict()),
        "python_random": _python_rng_json(),
        "config": config,
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(
    folder: Path,
    models: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    noise_generator: torch.Generator,
) -> Progress:
    """Restore everything `save_checkpoint` wrote; raises naming the file on any mismatch."""
    meta = json.loads((folder / "state.json").read_text())
    params = named_trainable(models)
    saved = load_file(folder / "lora.safetensors")
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"{folder}: checkpoint does not match this run's LoRA layers "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); was the config changed?"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    _load_optimizer(folder, params, optimizer, meta["param_groups"])
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    noise_generator.set_state(rng["noise"])
    cuda = [rng[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in rng]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return Progress(**meta["progress"])


def _load_optimizer(folder, params, optimizer, param_groups) -> None:
    moments = load_file(folder / "optimizer.safetensors")
    index_of = {id(p): i for i, p in enumerate(_optimizer_params(optimizer))}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        if key == "__empty__":
            continue
        name, _, field = key.partition("::")
        state.setdefault(index_of[id(params[name])], {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in step order (temporary folders are ignored)."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def remove_incomplete(output_dir: Path) -> list[Path]:
    """Delete what writes that died half-way left in the run folder (a SIGKILL or a power cut
    skips the cleanup): the temporary folders of checkpoints and the temporary files of
    exports, samples, reports and caches (see atomic.leftover_temporaries). They are never
    complete and never read. Call it before a run starts writing here; returns what was
    removed."""
    if not output_dir.is_dir():
        return []
    stale = leftover_temporaries(output_dir)
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


class CheckpointWriteError(UserError):
    """A checkpoint or export could not be written (full disk, permissions); names the last
    good checkpoint, which is intact."""


# What a failed write raises: OSError from Python's own file writes; safetensors' save_file
# reports the same I/O errors as SafetensorError ("I/O error: No space left on device (os
# error 28)"), which is not an OSError.
WRITE_ERRORS = (OSError, SafetensorError)


def write_failed(what: Path, error: Exception, output_dir: Path) -> CheckpointWriteError:
    """The error to raise when writing `what` failed with `error` (one of WRITE_ERRORS)."""
    reason = getattr(error, "strerror", None) or str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or f"os error {errno.ENOSPC})" in str(error):
        reason = "the disk is full (no space left on device)"
    done = list_checkpoints(output_dir)
    kept = (f"the last good checkpoint, {done[-1].name}, is intact: free some space and run the "
            "same command with --resume") if done else "no checkpoint had been written yet"
    return CheckpointWriteError(f"could not write {what}: {reason}. Nothing half-written was "
                                f"left behind, and {kept}.")


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step:06d}"


def _optimizer_params(optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _rng_tensors(noise_generator: torch.Generator) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state(), "noise": noise_generator.get_state()}
    if torch.cuda.is_available():  # device draws (the adapter dropouts) repeat on a resume too
        rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def _python_rng_json() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _jsonable(obj):
    """LR-scheduler state without callables (LambdaLR keeps its lambdas as None)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not callable(v)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


