"""Write toy-world datasets as image + caption pairs, the layout the trainer reads.

`write_toy_datasets(root)` writes what ships in `datasets/toy/`: for every style a training set
(seed 0) and a held-out set of other scenes (seed 1), the held-out scenes in the plain style too
(for measuring how much a style adapter leaks into prompts without its trigger word), and
`plain/`, plain scenes of a third seed: regularization images (`data.regularization`).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from sd_lora.world.scenes import make_example
from sd_lora.world.styles import STYLES, TOY_STYLES, Style

TOY_SIZE = 64
TOY_TRAIN_COUNT = 32
TOY_HELDOUT_COUNT = 16
TRAIN_SEED = 0
HELDOUT_SEED = 1
REGULARIZATION_SEED = 2


def write_dataset(out: Path, style: Style, count: int, size: int, seed: int) -> None:
    """Write NNNN.png + NNNN.txt pairs into `out` (created; must be empty or hold only such pairs)."""
    out.mkdir(parents=True, exist_ok=True)
    ours = [p for p in out.iterdir() if re.fullmatch(r"\d{4}\.(png|txt)", p.name)]
    others = sorted(p.name for p in out.iterdir() if p not in ours)
    if others:
        raise SystemExit(
            f"{out} holds files this script did not write ({others[:5]}); choose another --out"
        )
    for old in ours:  # a previous run's output, possibly with a larger --count
        old.unlink()
    for i in range(count):
        image, text = make_example(i, style, size, seed)
        image.save(out / f"{i:04d}.png", optimize=True)
        (out / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")


def write_toy_datasets(root: Path) -> list[Path]:
    """`root/<style>/` (training) and `root/heldout/<style>/` for every style, plain included."""
    written = [root / "plain"]
    write_dataset(root / "plain", STYLES["plain"], TOY_TRAIN_COUNT, TOY_SIZE, REGULARIZATION_SEED)
    for name in TOY_STYLES:
        written.append(root / name)
        write_dataset(root / name, STYLES[name], TOY_TRAIN_COUNT, TOY_SIZE, TRAIN_SEED)
    for name in ("plain", *TOY_STYLES):
        written.append(root / "heldout" / name)
        write_dataset(
            root / "heldout" / name, STYLES[name], TOY_HELDOUT_COUNT, TOY_SIZE, HELDOUT_SEED
        )
    return written


def toy_regularization_folder(parent: Path) -> Path:
    """`parent/toy-plain`: the toy world's plain regularization scenes, the same files as
    `datasets/toy/plain` (what the demo trains with), written once. The app gives them to a
    job on the toy base, inside its own folders (a job may read nothing outside them)."""
    folder = parent / "toy-plain"
    if folder.is_dir():
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".toy-plain.", dir=parent))
    write_dataset(tmp, STYLES["plain"], TOY_TRAIN_COUNT, TOY_SIZE, REGULARIZATION_SEED)
    try:
        tmp.rename(folder)  # whole or not at all; a job reading it never sees half of it
    except OSError:  # another request wrote it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
