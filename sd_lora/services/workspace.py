"""The app's folders, and the only way the app turns a user-given name into a path.

Every name that comes from a browser (an adapter, a base, an upload) is resolved with
`Workspace.resolve`, which refuses absolute paths, `..`, NUL bytes and symlinks that lead out of
the folder. Listing functions read safetensors headers only and never raise on a bad file: the
file is listed with `problem` set, so one damaged download does not hide the others.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath, PureWindowsPath

from sd_lora.adapters.files import nonfinite_in_file
from sd_lora.adapters.inspect import summarize_header
from sd_lora.adapters.run_folder import not_an_adapter, training_checkpoint_of
from sd_lora.errors import UserError
from sd_lora.models.bases import BUILTIN_BASES, HUB_ID, HUB_PREFIX, hub_repo_id

AREAS = ("adapters", "outputs", "runs", "models", "datasets")  # models, datasets: read only
PREVIEW_SUFFIXES = (".preview.png", ".png", ".jpg")  # A1111's order: .preview.png first
ZIP_MAX_BYTES = 2 * 1024**3
ZIP_MAX_FILES = 10_000


APP_FOLDER = "app"  # inside a training run folder: the app's outputs/ and runs/
RUN_RECORDS = ("config.toml", "summary.json")  # what every `sd-lora train` run folder holds
LATENT_CACHE = "latent-cache"  # a run's cached latents (data.cache_latents = "disk"): no adapters


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` is a training run's folder (what `sd-lora train` prints to open)."""
    return any((Path(folder) / name).is_file() for name in RUN_RECORDS)


def default_folder(adapters: Path, area: str) -> Path:
    """Where the app writes `area` ("outputs" or "runs") when not told: beside the adapters
    folder (./adapters -> ./outputs, ./runs); but inside a training run folder, under app/
    (runs/demo -> runs/demo/app/outputs), so that opening a run adds one folder to it and
    none among the other runs."""
    return adapters / APP_FOLDER / area if is_run_folder(adapters) else adapters.parent / area


class PathOutsideError(UserError):
    """A name that would leave its folder (absolute, `..`, a symlink pointing out)."""


class WorkspaceError(UserError):
    """A folder or upload the workspace cannot use; the message names it."""


@dataclass(frozen=True)
class Workspace:
    adapters: Path
    outputs: Path
    runs: Path
    models: Path | None = None
    datasets: Path | None = None  # image folders to train on (each subfolder is one dataset)

    @classmethod
    def create(cls, adapters, outputs=None, runs=None, models=None, datasets=None) -> Workspace:
        """Absolute folders; the writable ones (adapters, outputs, runs) are created. Without
        `outputs` or `runs`: see `default_folder`."""
        adapters = Path(adapters).expanduser().resolve()
        outputs = Path(outputs).expanduser().resolve() if outputs else default_folder(adapters, "outputs")
        runs = Path(runs).expanduser().resolve() if runs else default_folder(adapters, "runs")
        if models is not None:
            models = Path(models).expanduser().resolve()
            if not models.is_dir():
                raise WorkspaceError(f"models folder {models} does not exist; create it or fix --models")
        if datasets is not None:
            datasets = Path(datasets).expanduser().resolve()
            if not datasets.is_dir():
                raise WorkspaceError(
                    f"datasets folder {datasets} does not exist; create it or fix --datasets")
        for folder in (adapters, outputs, runs):
            folder.mkdir(parents=True, exist_ok=True)
        return cls(adapters=adapters, outputs=outputs, runs=runs, models=models, datasets=datasets)

    def root(self, area: str) -> Path:
        if area not in AREAS:
            raise WorkspaceError(f"unknown workspace area {area!r}; use one of {AREAS}")
        folder = getattr(self, area)
        if folder is None:
            raise WorkspaceError(f"no {area} folder is configured (start the app with --{area} DIR)")
        return Path(folder).resolve()  # `create` resolves already; a hand-made Workspace may not

    def resolve(self, area: str, name: str) -> Path:
        """`name` inside the `area` folder, symlinks followed; refuses anything that leaves it."""
        root = self.root(area)
        text = os.fspath(name)
        if not text or "\x00" in text:
            raise PathOutsideError(f"{area}: the name {text!r} is empty or contains a NUL byte")
        posix, windows = PurePosixPath(text), PureWindowsPath(text)
        if posix.is_absolute() or windows.is_absolute() or windows.drive or text.startswith("\\"):
            raise PathOutsideError(
                f"{area}: {text!r} is an absolute path; give a name relative to {root}"
            )
        if ".." in posix.parts or ".." in windows.parts:
            raise PathOutsideError(f"{area}: {text!r} contains '..'; give a name inside {root}")
        path = (root / text).resolve()
        if not path.is_relative_to(root):
            raise PathOutsideError(
                f"{area}: {text!r} leads to {path} (through a symlink), outside {root}; "
                "only files inside the folder are used"
            )
        return path

    def contains(self, path: Path) -> bool:
        """Whether `path` (symlinks followed) lies inside one of the workspace folders."""
        real = Path(path).resolve()
        areas = [a for a in AREAS if getattr(self, a) is not None]
        return any(real.is_relative_to(self.root(area)) for area in areas)


@dataclass(frozen=True)
class AdapterInfo:
    name: str  # relative to the adapters folder, without .safetensors ("sub/style")
    path: Path
    family: str | None
    format: str | None  # "kohya" | "diffusers"
    rank: int | None
    alpha: float | None
    trigger_words: list[str]
    preview: Path | None
    problem: str | None  # why the file cannot be used; None when it can


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def list_adapters(workspace: Workspace) -> list[AdapterInfo]:
    """Every `.safetensors` under the adapters folder (recursive), sorted by name; not the
    files of training runs that are not adapters (checkpoints, latent caches), nor the app's
    own outputs and runs when they lie inside the adapters folder (a run folder's app/)."""
    root = workspace.root("adapters")
    found = [p for p in root.rglob("*.safetensors")
             if _visible(p, root) and not p.is_dir() and not _run_internal(workspace, p)]
    infos = [adapter_info(workspace, path) for path in found]
    return sorted(infos, key=lambda info: info.name)


def _run_internal(workspace: Workspace, path: Path) -> bool:
    """Whether `path` is a file the adapter listing leaves out (see `list_adapters`)."""
    root = workspace.root("adapters")
    own = [folder for folder in (workspace.root("outputs"), workspace.root("runs"))
           if folder != root and folder.is_relative_to(root)]  # only what lies inside it
    cache = path.parent.name == LATENT_CACHE and is_run_folder(path.parent.parent)
    return (cache or any(path.is_relative_to(folder) for folder in own)
            or training_checkpoint_of(path) is not None)


def checkpoint_problem(workspace: Workspace, path: Path) -> str | None:
    """`run_folder.not_an_adapter` for a file in the adapters folder: the run's adapter named
    as the app lists it (relative to the adapters folder)."""
    root = workspace.root("adapters")

    def name_of(adapter: Path) -> str:
        real = adapter.resolve()
        return real.relative_to(root).as_posix() if real.is_relative_to(root) else str(adapter)

    return not_an_adapter(path, name_of)


def adapter_info(workspace: Workspace, path: Path) -> AdapterInfo:
    """What the header says about one adapter file; problems are reported, never raised."""
    root = workspace.root("adapters")
    name = path.relative_to(root).with_suffix("").as_posix()
    preview = _preview(path)
    if not path.resolve().is_relative_to(root):
        return AdapterInfo(name, path, None, None, None, None, [], preview,
                           f"{path} is a symlink to {path.resolve()}, outside {root}")
    if (problem := checkpoint_problem(workspace, path)) is not None:  # chosen by name
        return AdapterInfo(name, path, None, None, None, None, [], preview, problem)
    s = summarize_header(path)
    return AdapterInfo(name, path, s.family, s.layout, s.rank, s.alpha, s.trigger_words, preview,
                       s.problem)


def chosen_adapter_info(workspace: Workspace, path: Path) -> AdapterInfo:
    """`adapter_info`, plus a check of the values (NaN/inf render black images), which reads
    the whole file: done for the file a user picks, not for every file of a listing (a folder
    of LoRAs can hold gigabytes). Loading for generation checks them again, always."""
    info = adapter_info(workspace, path)
    if info.problem is None and (problem := nonfinite_in_file(path)) is not None:
        info = replace(info, problem=problem)
    return info


def _preview(path: Path) -> Path | None:
    stem = path.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def list_bases(workspace: Workspace) -> list[str]:
    """The built-in bases, then diffusers folders and single-file .safetensors under `models`, sorted."""
    found: list[str] = []
    root = workspace.root("models") if workspace.models is not None else None
    if root is not None and root.is_dir():
        for folder, dirs, files in os.walk(root):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if here != root and "model_index.json" in files:
                found.append(here.relative_to(root).as_posix())
                dirs[:] = []  # its component .safetensors are not checkpoints
                continue
            for file in files:
                path = here / file
                if file.lower().endswith(".safetensors") and not file.startswith("."):
                    if path.resolve().is_relative_to(root):
                        found.append(path.relative_to(root).as_posix())
    return list(BUILTIN_BASES) + sorted(found)


def resolve_base(workspace: Workspace, choice: str) -> str:
    """What `load_pipeline` gets for a base chosen in the app: a built-in base, a path inside the
    models folder, or a hub id written `hf://org/name`, which the loader never looks up on disk
    (a bare `org/name` is read from the working directory when a folder of that name is there).
    Errors speak of the models folder only, so they never tell whether a path elsewhere exists."""
    if choice in BUILTIN_BASES:
        return choice
    if workspace.models is not None and not choice.startswith(HUB_PREFIX):
        local = workspace.resolve("models", choice)
        if local.exists():
            return str(local)
    if HUB_ID.match(hub_repo_id(choice)):
        return HUB_PREFIX + hub_repo_id(choice)
    if workspace.models is not None:
        raise WorkspaceError(
            f"base {choice!r} is not in the models folder {workspace.models}; choose one of "
            f"{list_bases(workspace)}, or an org/name hub id"
        )
    raise WorkspaceError(
        f"base {choice!r} is not 'toy' or 'tiny', an org/name hub id, or a model inside the models folder "
        "(start the app with --models DIR to use local models)"
    )


def extract_zip(workspace: Workspace, zip_path: Path, name: str) -> Path:
    """Unpack an uploaded zip into runs/uploads/<name>/ after checking every entry."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise WorkspaceError(f"upload name {name!r} must be a plain folder name (no '/', no '.')")
    target = workspace.resolve("runs", f"uploads/{name}")
    if target.exists():
        raise WorkspaceError(f"{target} already exists; choose another name for this upload")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise WorkspaceError(f"{zip_path}: not a readable zip file ({e})") from e
    with archive:
        entries = _checked_entries(archive, zip_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
        try:
            for info in entries:
                _extract_entry(archive, info, tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _checked_entries(archive: zipfile.ZipFile, zip_path: Path) -> list[zipfile.ZipInfo]:
    entries = archive.infolist()
    if len(entries) > ZIP_MAX_FILES:
        raise WorkspaceError(f"{zip_path}: {len(entries)} entries; at most {ZIP_MAX_FILES} allowed")
    total = sum(info.file_size for info in entries)
    if total > ZIP_MAX_BYTES:
        raise WorkspaceError(
            f"{zip_path}: {total:,} bytes uncompressed; at most {ZIP_MAX_BYTES:,} allowed"
        )
    for info in entries:
        text = info.filename
        parts = PurePosixPath(text.replace("\\", "/")).parts
        if text.startswith(("/", "\\")) or PureWindowsPath(text).drive or "\x00" in text:
            raise PathOutsideError(f"{zip_path}: entry {text!r} is an absolute path; refused")
        if ".." in parts:
            raise PathOutsideError(f"{zip_path}: entry {text!r} contains '..'; refused")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise PathOutsideError(f"{zip_path}: entry {text!r} is a symlink; refused")
    return entries


def _extract_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, folder: Path) -> None:
    """Copy one checked entry, counting bytes (a header may understate them)."""
    destination = folder.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
    if info.is_dir():
        destination.mkdir(parents=True, exist_ok=True)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with archive.open(info) as source, open(destination, "wb") as sink:
        while chunk := source.read(1 << 20):
            written += len(chunk)
            if written > info.file_size:
                raise WorkspaceError(f"zip entry {info.filename!r} is larger than its header says")
            sink.write(chunk)
