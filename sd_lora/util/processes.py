"""Which process this is when several train (torchrun, accelerate launch): readable before
Accelerate starts, from the launcher's RANK variable."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """The first of several processes, or the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def say(text: str) -> None:
    """print, from the main process only (N processes would print everything N times);
    flushed, so that a log file or a pipe shows each line when it happens."""
    if is_main_process():
        print(text, flush=True)
