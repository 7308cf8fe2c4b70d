"""What a run is doing right now, told to the console: each long step (loading the base,
caching, evaluating, rendering samples, exporting, the quality report) prints a line when it
starts and one when it ends, and between them, where it has several items, a tqdm bar with the
count and the time left. Without bars (`--no-progress`, the app's log) the two lines remain, so
no step of a run is silent for minutes. Inside `PhaseClock()` every phase's seconds are also
summed by name: what `timing.json` reports.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from tqdm import tqdm

from sd_lora.util.processes import is_main_process, say

_clocks: list[PhaseClock] = []  # the clocks open now (innermost last)


class PhaseClock(contextlib.ContextDecorator):
    """While open, the seconds each phase takes, summed by phase name (`seconds`), and the
    wall time since it opened (`elapsed`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def __enter__(self) -> PhaseClock:
        self.started = time.perf_counter()
        _clocks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _clocks.remove(self)


@contextlib.contextmanager
def phase(name: str, doing: str, total: int = 0, unit: str = "image",
          bar: bool = True) -> Iterator[Callable[[int], object]]:
    """`name: doing ...` now, `name: done in N s` at the end (not after an error: the error
    says what happened); with `bar` and a `total`, a bar over the items in between. Yields the
    function that advances the bar by n items (it does nothing without one)."""
    if not is_main_process():  # N processes would print everything N times
        yield lambda n=1: None
        return
    say(f"{name}: {doing} ...")
    started = time.perf_counter()
    # Erased when done: the closing line says how long it took.
    progress = tqdm(total=total, desc=name, unit=unit, leave=False, disable=not (bar and total))
    try:
        yield progress.update
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    for clock in _clocks:
        clock.add(name, seconds)
    say(f"{name}: done in {seconds:.1f} s")
