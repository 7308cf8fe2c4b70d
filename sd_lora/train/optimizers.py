"""The optimizers a user of sd-scripts or OneTrainer expects, under their usual names.

    adamw      torch.optim.AdamW (the default)
    adamw8bit  bitsandbytes' AdamW8bit: optimizer state in 8 bits (needs bitsandbytes; its
               8-bit kernels need a CUDA GPU, so on a CPU this is refused with the reason)
    prodigy    Prodigy (the `prodigyopt` package): estimates the step size itself, so the
               learning rate is a multiplier, 1.0 as its authors advise
    adafactor  transformers' Adafactor with a fixed learning rate (relative_step and
               scale_parameter off, as sd-scripts sets it when a learning rate is given)

`train.optimizer_args` adds keyword arguments (`["d_coef=2", "use_bias_correction=true"]`,
sd-scripts' optimizer_args); an argument the optimizer does not take is an error naming it
and listing those it does.
"""

from __future__ import annotations

import inspect

import torch

from sd_lora.choices import OPTIMIZERS, OptimizerError, parse_optimizer_args

# ss_optimizer, as sd-scripts writes it: the class's full name, then any optimizer_args.
CLASS_NAMES = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
               "prodigy": "prodigyopt.prodigy.Prodigy", "adafactor": "transformers.optimization.Adafactor"}


def optimizer_label(cfg) -> str:
    args = ",".join(str(a) for a in cfg.optimizer_args)
    return CLASS_NAMES[cfg.optimizer] + (f"({args})" if args else "")


def optimizer_class(name: str):
    """The optimizer class for `name`, imported on demand; raises naming what is missing."""
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise OptimizerError(
                "train.optimizer = 'prodigy' needs the prodigyopt package: pip install prodigyopt"
            ) from None
        return Prodigy
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise OptimizerError(
                "train.optimizer = 'adamw8bit' needs bitsandbytes (pip install bitsandbytes) and "
                "a CUDA GPU for its 8-bit kernels; use 'adamw' here"
            ) from None
        if not torch.cuda.is_available():
            raise OptimizerError(
                "train.optimizer = 'adamw8bit': bitsandbytes' 8-bit optimizer kernels need a CUDA "
                "GPU and none is present; use 'adamw' (or 'adafactor' for less optimizer memory)"
            )
        return bitsandbytes.optim.AdamW8bit
    raise OptimizerError(f"train.optimizer = {name!r}; use one of {OPTIMIZERS}")


def base_kwargs(name: str, cfg) -> dict[str, object]:
    """What the config's own fields set for this optimizer (train.adam_* for the Adam family)."""
    if name in ("adamw", "adamw8bit", "prodigy"):
        return {"betas": (cfg.adam_beta1, cfg.adam_beta2), "weight_decay": cfg.adam_weight_decay,
                "eps": cfg.adam_epsilon}
    return {"scale_parameter": False, "relative_step": False, "warmup_init": False,
            "weight_decay": cfg.adam_weight_decay}


def build_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """`cfg.optimizer` over parameter `groups` (each with its "lr"), with train.optimizer_args."""
    cls = optimizer_class(cfg.optimizer)
    kwargs = base_kwargs(cfg.optimizer, cfg)
    kwargs.update(parse_optimizer_args(cfg.optimizer_args))
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise OptimizerError(
            f"train.optimizer_args: {cls.__name__} takes no {', '.join(unknown)}; it takes "
            f"{', '.join(sorted(accepted - {'lr'}))}"
        )
    try:
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as e:
        raise OptimizerError(f"train.optimizer = {cfg.optimizer!r}: {e}") from None
