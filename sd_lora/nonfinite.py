"""NaN and inf in training: found at the step they happen, that step skipped, and the run
stopped with the likely cause when they keep coming.

A skipped step changes nothing (no optimizer or schedule step), so the adapter and the last
checkpoint stay as good as they were; the run makes its max_steps real updates with later
batches. Under fp16 mixed precision, inf *gradients* are the loss scaler's business (it skips
that step and lowers its scale, as designed); a non-finite *loss* is never normal.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from sd_lora.errors import UserError

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss or gradients stayed NaN/inf; the message names the likely causes and the fix."""


def gradients_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """True when every gradient present is free of NaN and inf."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None]
    return not norms or bool(torch.isfinite(torch.stack(norms).sum()))


class NonFiniteGuard:
    """Counts skipped steps; raises TrainingDiverged after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int, mixed_precision: str, learning_rate: float) -> None:
        self.max_consecutive = max_consecutive
        self.mixed_precision = mixed_precision
        self.learning_rate = learning_rate
        self.skipped = 0  # over the whole run (this process's life)
        self.in_a_row = 0
        self.first_bad_step: int | None = None

    def good(self) -> None:
        self.in_a_row, self.first_bad_step = 0, None

    def bad(self, step: int, loss: float, what: str) -> None:
        """Record a skipped step (`step` is the update it would have been); raise past the limit."""
        self.skipped += 1
        self.in_a_row += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        logger.warning("step %d skipped: %s (loss %.4g); %d skipped so far", step, what, loss,
                       self.skipped)
        if self.max_consecutive and self.in_a_row >= self.max_consecutive:
            raise TrainingDiverged(self.message(step, what))

    def message(self, step: int, what: str) -> str:
        causes = []
        if self.mixed_precision == "fp16":
            causes.append("fp16 overflow: train in bf16 (--mixed-precision bf16) or fp32 "
                          "(--mixed-precision no)")
        causes.append(f"a learning rate too high: train.learning_rate = {self.learning_rate:g}; "
                      f"try {self.learning_rate / 10:g}")
        causes.append("an image that decodes to extreme values: run `sd-lora check` on the data")
        return (
            f"training stopped: {what} at {self.in_a_row} steps in a row (from step "
            f"{self.first_bad_step} to {step}; {self.skipped} skipped in all). Likely causes: "
            + "; ".join(causes) + ". No bad update was applied and the last checkpoint is "
            "intact; train the fixed settings into a new --output."
        )


def describe(bad_loss: float | None, grads_ok: bool) -> str:
    """What went wrong in a skipped step: a non-finite loss first, else the gradients."""
    if bad_loss is not None:
        return f"the loss is {bad_loss}"
    return "the gradients hold NaN or inf" if not grads_ok else "nothing"
