"""Where a run goes when its job does not say: train.output_dir and train.name left "" are
derived from the data, so that two trainings on different folders never share a run folder.

    runs/<data folder name>/<data folder name>.safetensors     the first run on a folder
    runs/<data folder name>-2/...                              the next, when the first is there

`--resume` continues the latest of them instead of starting another.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sd_lora.config import DataConfig, JobConfig
from sd_lora.util.processes import say

RUNS_FOLDER = Path("runs")  # relative to the working directory, as a given --output is
FALLBACK_NAME = "run"  # a data path with no usable last part ("/")
MAX_SUFFIX = 10_000


def with_run_names(config: JobConfig, resume: bool) -> JobConfig:
    """`config` with train.name and train.output_dir filled in where they are "" (the
    defaults): the name from the data, the folder a fresh `runs/<name>[-N]` (or, resuming, the
    latest). Values the job sets are kept as they are."""
    train = config.train
    if train.name and train.output_dir:
        return config
    name = train.name or data_name(config.data)
    output_dir = train.output_dir
    if not output_dir:
        folder = run_folder(RUNS_FOLDER, name, resume)
        output_dir = str(folder)
        how = "the latest run" if resume and _taken(folder) else "a new run folder"
        after = "train.name" if train.name else "the data"
        say(f"run folder: {folder} ({how} named after {after}; --output chooses another)")
    return replace(config, train=replace(train, name=name, output_dir=output_dir))


def data_name(data: DataConfig) -> str:
    """The name of what is trained: the data folder's (or dataset config file's) own name."""
    source = Path(data.dataset_config).stem if data.dataset_config else _folder_name(data.path)
    name = "".join(c for c in source if c not in '/\\:"*?<>|').strip(". ")
    return name or FALLBACK_NAME


def _folder_name(path: str) -> str:
    # "." and "datasets/x/" name their folder too; resolve() gives "." its real name.
    return Path(path).expanduser().resolve().name if path else ""


def run_folder(runs: Path, name: str, resume: bool) -> Path:
    """runs/<name>, or the first free runs/<name>-N after it. A folder is taken when it holds
    anything (another run, or files that are not ours to mix with). Resuming: the last taken
    one, whose checkpoints the run continues."""
    candidates = (runs / (name if n == 1 else f"{name}-{n}") for n in range(1, MAX_SUFFIX))
    latest = None
    for folder in candidates:
        if not _taken(folder):
            return latest if resume and latest is not None else folder
        latest = folder
    raise ValueError(f"{runs}: {MAX_SUFFIX} run folders named {name}; pass --output")  # pragma: no cover


def _taken(folder: Path) -> bool:
    # An empty folder is free: a start that failed leaves none (train.removed_if_left_empty),
    # and with several processes the main one may have just made it for all of them.
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))
