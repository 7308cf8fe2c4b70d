"""The base of every error caused by the user's input (a file, a field, a value), and the exit
statuses a command reports.

The CLI (and the app's training jobs) print these as one readable message and exit with status
2; an interrupt exits with 130 after the last checkpoint; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

INTERRUPTED = 130  # Ctrl-C / SIGINT (and SIGTERM during training), as shells report it


class UserError(ValueError):
    """Bad input; the message names the file or field, the value, and what to do."""


def exit_status(run: Callable[[], int]) -> int:
    """`run()`'s status, or 2 after printing a UserError (SD_LORA_DEBUG=1: raised, with its
    traceback), or INTERRUPTED after Ctrl-C."""
    try:
        return run()
    except UserError as exc:
        if os.environ.get("SD_LORA_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return INTERRUPTED
