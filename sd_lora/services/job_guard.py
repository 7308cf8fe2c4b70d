"""What a job that the app starts may touch: files and folders inside the app's folders, and
no pickles.

The app's client sends the whole job TOML, so every field that names a file or folder is
checked. The fields are found by their types in sd_lora.config (`ReadPath`, `WritePath`,
`BaseName`, `Unpickles`), so a field added later is checked without a list to keep.

- A relative path is taken from the runs folder (where the Train tab's `datasets/<name>` and
  `uploads/<name>` are); the job's TOML gets the absolute path, since the trainer runs in the
  job's own folder and would read a relative path from there.
- A folder the job reads (ReadPath) must be inside one of the app's folders; a folder it writes
  (WritePath) inside the runs folder. A path is checked by its text first (so nothing outside is
  looked at), then with symlinks followed; the error is the same either way, and never says
  whether something outside exists.
- The image folders of a data.dataset_config must be inside too.
- An empty report.heldout / report.off_style is looked for beside the data folder; the app
  looks itself, inside its folders only, and writes what it found (report.look_beside_data
  = false), so the trainer never looks elsewhere.
- model.base goes through `resolve_base` (a built-in, inside --models, or a hub id that is
  never looked up on disk), and a field that would open a pickle is refused.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from sd_lora.config import BASE, READS, UNPICKLES, WRITES, JobConfig, marked_fields
from sd_lora.data.sd_scripts_toml import read_dataset_toml
from sd_lora.errors import UserError
from sd_lora.services.workspace import AREAS, Workspace, resolve_base


class JobRefused(UserError):
    """A job setting that would reach outside the app's folders or open a pickle; names it."""


def guard_job(config: JobConfig, workspace: Workspace) -> JobConfig:
    """`config` with its base resolved and every path absolute and inside `workspace`; raises
    JobRefused naming the first field that is not, or that would open a pickle."""
    for dotted in marked_fields(UNPICKLES):
        if _get(config, dotted):
            raise JobRefused(
                f"{dotted} = true: the app never opens pickles (.ckpt, .pt: loading one can run "
                "code); convert the file to .safetensors and leave the setting out"
            )
    for dotted in marked_fields(BASE):
        try:
            config = _set(config, dotted, resolve_base(workspace, _get(config, dotted)))
        except UserError as e:  # the same error, naming the field
            raise type(e)(f"{dotted}: {e}") from None
    for marker in (READS, WRITES):
        for dotted in marked_fields(marker):
            value, writes = _get(config, dotted), marker is WRITES
            if isinstance(value, str):
                value = _inside(workspace, dotted, value, writes)
            else:  # a list of paths
                value = tuple(_inside(workspace, dotted, text, writes) for text in value)
            config = _set(config, dotted, value)
    _check_dataset_config(workspace, config.data.dataset_config)
    return _pin_report_folders(workspace, config)


def _inside(workspace: Workspace, dotted: str, text: str, writes: bool) -> str:
    """`text` as an absolute path inside the app's folders (the runs folder for writes);
    "" (unset: the trainer's default, itself inside) stays as it is."""
    if not text:
        return text
    roots = _roots(workspace, writes)
    if "\x00" not in text:
        path = Path(os.path.normpath(Path(workspace.runs, text)))  # an absolute text stays itself
        if _is_inside(path, roots):
            return str(path.resolve())
    where = (f"inside the runs folder {workspace.runs}" if writes else
             f"inside the app's folders ({', '.join(str(r) for r in roots)})")
    raise JobRefused(
        f"{dotted} = {text!r} is outside the app's folders: a job started in the app "
        f"{'writes' if writes else 'reads'} only {where}; a relative path is taken from "
        f"{workspace.runs}. Give a path there, or leave the setting empty"
    )


def _roots(workspace: Workspace, writes: bool) -> list[Path]:
    if writes:
        return [workspace.root("runs")]
    return [workspace.root(area) for area in AREAS if getattr(workspace, area) is not None]


def _is_inside(path: Path, roots: list[Path]) -> bool:
    """By the text of the absolute, normalised `path` first, so that nothing outside is looked
    at; then with symlinks followed."""
    inside = any(path.is_relative_to(root) for root in roots)
    return inside and any(path.resolve().is_relative_to(root) for root in roots)


def _check_dataset_config(workspace: Workspace, path: str) -> None:
    """The subsets' image folders of an sd-scripts dataset TOML (itself checked already)."""
    if not path:
        return
    roots = _roots(workspace, writes=False)
    for i, subset in enumerate(read_dataset_toml(path).subsets, 1):
        if not _is_inside(Path(os.path.normpath(subset.image_dir)), roots):  # absolute already
            raise JobRefused(  # not naming where it leads: a symlink's target is outside
                f"data.dataset_config: the image_dir of subset #{i} in {path} is outside the "
                f"app's folders; a job started in the app reads only inside "
                f"{', '.join(str(r) for r in roots)} (a relative image_dir is taken from the "
                "dataset TOML's folder)"
            )


def _pin_report_folders(workspace: Workspace, config: JobConfig) -> JobConfig:
    """Look for the report's default folders here, inside the app's folders only, and write
    what was found: the trainer then never looks beside the data folder itself, which for a
    data folder at the top of an app folder is outside it."""
    from sd_lora.train.report import default_folders  # lazily: it imports torch

    report = config.report
    if not report.look_beside_data:
        return config
    roots, found = _roots(workspace, writes=False), {}
    for field, candidate in default_folders(config.data.path).items():
        candidate = Path(os.path.normpath(candidate))
        if not getattr(report, field) and _is_inside(candidate, roots) and candidate.is_dir():
            found[field] = str(candidate.resolve())
    return replace(config, report=replace(report, look_beside_data=False, **found))


def _get(config: JobConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def _set(config: JobConfig, dotted: str, value) -> JobConfig:
    section, name = dotted.split(".")
    return replace(config, **{section: replace(getattr(config, section), **{name: value})})
