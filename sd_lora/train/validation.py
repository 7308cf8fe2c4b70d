"""Validation while training: a held-out set's denoising loss at fixed timesteps and noise,
logged; the adapter at the best validation loss kept; optionally an early stop.

The held-out images are `data.validation_path`, or `data.validation_split` of the dataset's
images chosen by a hash of (seed, file content), so the split is the same in every run and a
renamed file stays on its side. Held-out images never train.

Each validation is `evaluate.eval_loss` on the held-out images at the evaluation timesteps with
noise fixed by a seed, so two values differ only because the adapter did. The best value and
its step live in `validation.json` beside the checkpoints: a resumed run carries on from them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from sd_lora.data.scan import Sample
from sd_lora.util.atomic import atomic_path

STATE_FILE = "validation.json"
LOG_FILE = "validation.csv"


def split_samples(samples: list[Sample], share: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training, held out): ceil(share x images) held out (at least one when share > 0, and
    at least one left to train), chosen by sha256(seed, content digest)."""
    if share <= 0:
        return list(samples), []
    count = min(len(samples) - 1, max(1, math.ceil(share * len(samples))))
    if count < 1:
        return list(samples), []

    def rank(sample: Sample) -> str:
        return hashlib.sha256(f"{seed}:{sample.digest or sample.image.name}".encode()).hexdigest()

    held = set(map(id, sorted(samples, key=rank)[:count]))
    return [s for s in samples if id(s) not in held], [s for s in samples if id(s) in held]


@dataclass
class ValidationState:
    best_loss: float | None = None
    best_step: int | None = None
    since_best: int = 0  # validations without improvement

    @classmethod
    def read(cls, output_dir: Path) -> ValidationState:
        path = output_dir / STATE_FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(data.get("best_loss"), data.get("best_step"), data.get("since_best", 0))

    def write(self, output_dir: Path) -> None:
        with atomic_path(output_dir / STATE_FILE) as tmp:
            Path(tmp).write_text(json.dumps(self.__dict__, indent=2) + "\n")


class Validator:
    """Runs a validation every `every` steps; `export_best(step)` writes the best adapter."""

    def __init__(self, measure, every: int, patience: int, output_dir: Path, export_best,
                 resumed: bool, write: bool = True) -> None:
        """`write`: this process keeps the files (the main one; every process measures, so
        all agree when to stop)."""
        self.measure, self.every, self.patience = measure, every, patience
        self.output_dir, self.export_best, self.write = output_dir, export_best, write
        self.state = ValidationState.read(output_dir) if resumed else ValidationState()
        self.log = output_dir / LOG_FILE
        if write and (not resumed or not self.log.exists()):
            self.log.write_text("step,validation_loss,best\n")

    def due(self, step: int, last: bool) -> bool:
        return last or (self.every > 0 and step % self.every == 0)

    def validate(self, step: int) -> tuple[float, bool]:
        """(loss, stop): measure, log, keep the best; stop when patience has run out."""
        loss = float(self.measure())
        improved = self.state.best_loss is None or loss < self.state.best_loss
        if improved:
            self.state.best_loss, self.state.best_step, self.state.since_best = loss, step, 0
            self.export_best(step)
        else:
            self.state.since_best += 1
        if self.write:
            with self.log.open("a") as handle:
                handle.write(f"{step},{loss:.6f},{int(improved)}\n")
            self.state.write(self.output_dir)
        stop = self.patience > 0 and self.state.since_best >= self.patience
        return loss, stop
