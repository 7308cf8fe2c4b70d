"""Ctrl-C and SIGTERM during training: finish the optimizer step under way, save, then stop.

An interrupt raised at an arbitrary line can land between `optimizer.step()` and the step
counter, so a checkpoint written then pairs one step's weights with the previous step's
position and a resumed run repeats that step. During the loop, the first SIGINT or SIGTERM
only sets `requested`; the loop checks it between optimizer steps, saves a consistent
checkpoint and raises KeyboardInterrupt. A second signal stops at once (the last complete
checkpoint is kept; nothing half-done is saved).

Signal handlers can only be set in the main thread; elsewhere (a training thread) this does
nothing and an interrupt arrives as before.
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ImmediateStop(KeyboardInterrupt):
    """A second interrupt: stop now, without saving the step under way."""


class StopSignals:
    def __init__(self, notice: bool = True) -> None:
        self.requested = False
        self.notice = notice
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise ImmediateStop
        self.requested = True
        if self.notice:
            print("\nstopping after this step (interrupt again to stop now, without saving it)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def stop_on_sigterm() -> None:
    """SIGTERM (`kill`, a scheduler's stop, a container shutting down) stops training the way
    Ctrl-C does: a checkpoint is saved, then the process exits with 130."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
