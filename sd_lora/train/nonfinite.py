"""NaN and inf in training: found at the step they happen, that step skipped, and the run
stopped with the likely cause when they keep coming.

A skipped step changes nothing (no optimizer or schedule step), so the adapter and the last
checkpoint stay as good as they were; the run makes its max_steps real updates with later
batches. Under fp16 mixed precision, inf *gradients* are the loss scaler's business (it skips
that step and lowers its scale, as designed); a non-finite *loss* is never normal.

Finite gradients can still give a non-finite *update* (an optimizer setting that divides by
zero, an optimizer's own overflow). So each step is taken over a `StepSnapshot`: when a weight
comes out NaN/inf, the weights and the optimizer's state (Adam's moments and step count,
Prodigy's estimates) are put back as they were, and the step counts as skipped like the others.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch

from sd_lora.errors import UserError
from sd_lora.util.words import plural

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss or gradients stayed NaN/inf; the message names the likely causes and the fix."""


def gradients_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """True when every gradient present is free of NaN and inf."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None]
    return not norms or bool(torch.isfinite(torch.stack(norms).sum()))


def count_nonfinite(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(tensors holding NaN or inf, tensors in all); one reduction when all are finite."""
    tensors = list(tensors)
    norms = [torch.linalg.vector_norm(t.detach().float()) for t in tensors]
    if not norms or bool(torch.isfinite(torch.stack(norms).sum())):
        return 0, len(tensors)
    return sum(not bool(torch.isfinite(n)) for n in norms), len(tensors)


class StepSnapshot:
    """The trainable weights and the optimizer's whole state before one optimizer step, to put
    back if the step makes a weight NaN/inf: restoring the weights alone would leave Adam's
    moments and step count advanced by an update that never happened (and a checkpoint that
    disagrees with a run that skipped the batch). Costs one copy of the weights and moments."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        self.optimizer, self.params = optimizer, params
        with torch.no_grad():
            self.weights = [p.detach().clone() for p in params]
        self.state = {p: _cloned(optimizer.state[p]) for p in params if p in optimizer.state}
        # Per-group state too: Prodigy keeps its step-size estimate (d, k) in the groups.
        self.groups = [copy.deepcopy({k: v for k, v in g.items() if k != "params"})
                       for g in optimizer.param_groups]

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, self.weights):
                p.copy_(saved)
        for p in self.params:  # a first step created state that did not exist before it
            self.optimizer.state.pop(p, None)
        for p, saved in self.state.items():
            self.optimizer.state[p] = saved
        for group, saved in zip(self.optimizer.param_groups, self.groups):
            group.update(saved)


def _cloned(state: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in state.items()}


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

    def bad(self, step: int, loss: float, what: str, update: bool = False) -> None:
        """Record a skipped step (`step` is the update it would have been; `update`: the loss
        and gradients were finite, the optimizer's update was not); raise past the limit."""
        self.skipped += 1
        self.in_a_row += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        logger.warning("step %d skipped: %s (loss %.4g); %d skipped so far", step, what, loss,
                       self.skipped)
        if self.max_consecutive and self.in_a_row >= self.max_consecutive:
            raise TrainingDiverged(self.message(step, what, update))

    def message(self, step: int, what: str, update: bool = False) -> str:
        causes = []
        if update:
            causes.append("an optimizer setting that divides by zero or overflows: check "
                          "train.optimizer_args and train.adam_* (epsilon > 0, betas below 1)")
        if self.mixed_precision == "fp16":
            causes.append("fp16 overflow: train in bf16 (--mixed-precision bf16) or fp32 "
                          "(--mixed-precision no)")
        causes.append(f"a learning rate too high: train.learning_rate = {self.learning_rate:g}; "
                      f"try {self.learning_rate / 10:g}")
        causes.append("an image that decodes to extreme values: run `sd-lora check` on the data")
        kept = ("Each bad update was undone before anything was saved" if update
                else "No bad update was applied")
        return (
            f"training stopped: {what} at {plural(self.in_a_row, 'step')} in a row (from step "
            f"{self.first_bad_step} to {step}; {self.skipped} skipped in all). Likely causes: "
            + "; ".join(causes) + f". {kept} and the last checkpoint is intact; train the "
            "fixed settings into a new --output."
        )


def describe_update(bad: int, total: int) -> str:
    """What went wrong in a step whose update was undone (see StepSnapshot)."""
    return (f"the update made NaN or inf in {bad} of {total} LoRA tensors (finite loss and "
            "gradients); it was undone")


def describe(bad_loss: float | None, grads_ok: bool) -> str:
    """What went wrong in a skipped step: a non-finite loss first, else the gradients."""
    if bad_loss is not None:
        return f"the loss is {bad_loss}"
    return "the gradients hold NaN or inf" if not grads_ok else "nothing"
