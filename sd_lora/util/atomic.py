"""Write files so that they are complete or absent: a temporary name in the same folder, flushed
and fsynced, then renamed over the target (a crash never leaves half a file under the real name).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# The names of the temporaries below: ".<target name>.<tempfile's random part>.tmp".
TEMPORARY_RE = re.compile(r"^\..+\.[a-z0-9_]+\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is synced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes_atomically(path: str | os.PathLike, blob: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return Path(path)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success its files are fsynced and it
    replaces `path` (an existing `path` is removed first: the window where neither exists is a
    rename, never a half-written folder under the real name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def leftover_temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporary files and folders of `atomic_path` and `atomic_folder` under `folder`, at
    any depth: left by a writer that was killed (SIGKILL, a power cut) before its cleanup ran.
    They are never complete and never read; nothing else is named like them. Symlinked folders
    are not followed."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [Path(root, name) for name in files if TEMPORARY_RE.match(name)]
        found += [Path(root, name) for name in dirs if TEMPORARY_RE.match(name)]
        dirs[:] = [name for name in dirs if not TEMPORARY_RE.match(name)]  # removed whole
    return sorted(found)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves."""
    for sub in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        flags = os.O_RDONLY
        fd = os.open(sub, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
