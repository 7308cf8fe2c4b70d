"""An exponential moving average of the adapter's weights (train.ema_decay), kept in fp32.

The averaging is diffusers' `EMAModel`: the n-th update uses decay min(ema_decay, n / (9 + n))
(the first copies the weights), so early weights fade fast. Its state is saved in every checkpoint, by parameter
name, so a resumed run continues the same average. At the end the averaged weights are what
the run evaluates, reports and exports as <name>.safetensors; the last raw weights are
exported beside them as <name>-raw.safetensors. Validation measures the average too (it is
what would be exported at that step), and `<name>-best` is the average at the best step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.training_utils import EMAModel

STEP_KEY = "ema::__step__"


class AdapterEMA:
    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.names = list(named_params)
        self.params = list(named_params.values())
        self.model = EMAModel([p.detach().float() for p in self.params], decay=decay)

    @torch.no_grad()
    def update(self) -> None:
        self.model.step([p.float() for p in self.params])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The average and its update count, for a checkpoint."""
        out = {f"ema::{n}": s.detach().cpu().contiguous()
               for n, s in zip(self.names, self.model.shadow_params)}
        out[STEP_KEY] = torch.tensor(self.model.optimization_step)
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if f"ema::{n}" not in tensors]
        if missing or STEP_KEY not in tensors:
            raise ValueError(f"the checkpoint has no EMA state for {missing[:3] or 'its step'}; "
                             "was train.ema_decay changed?")
        self.model.shadow_params = [tensors[f"ema::{n}"].float().clone() for n in self.names]
        self.model.optimization_step = int(tensors[STEP_KEY])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model for a while (a validation), then the raw ones back."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            self.apply()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)

    def apply(self) -> None:
        """Put the averaged weights in the model (training is over)."""
        with torch.no_grad():
            for p, s in zip(self.params, self.model.shadow_params):
                p.copy_(s.to(p.device, p.dtype))
