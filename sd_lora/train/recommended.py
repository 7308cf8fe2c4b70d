"""What each base trains well with: the values that train.learning_rate,
train.text_encoder_learning_rate and train.max_steps stand for when left at 0 (their default).

    config = with_recommended(config)   # the 0s replaced by the base's recommendation
    plan_line(config)                    # what `sd-lora train` and `sd-lora check` print

- "toy": tuned on the README's demo (examples/demo.toml repeats these values, and a test checks
  that they agree). The toy base is small: at SD's 1e-4 an adapter changed nothing visible. Its
  text encoder learns four times faster than its UNet: a trigger word is a token the base never
  saw, and the text encoder is what makes it a condition (measured: the README's demo table).
- "tiny", "tiny-sdxl", "tiny-sd3": random test models; the values they always trained with, so that the
  tests that train them keep their figures.
- any other base (an SD 1.x, 2.x or SDXL folder, file or hub id): the usual community values
  for a style LoRA (1e-4 for the UNet, half that for the text encoder, 1500 steps: the
  "standard" preset's). The family is not needed to choose them, so nothing is loaded.

Prodigy sets its own step size; its learning rate is a multiplier, 1.0 as its authors advise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sd_lora.config import JobConfig


@dataclass(frozen=True)
class Recommended:
    learning_rate: float
    text_encoder_learning_rate: float
    max_steps: int
    base: str  # the bases it is for, in words: "the toy base"


RECOMMENDED = {
    "toy": Recommended(5e-4, 2e-3, 300, "the toy base"),
    "tiny": Recommended(1e-4, 5e-5, 200, "the tiny test base"),
    "tiny-sdxl": Recommended(1e-4, 5e-5, 200, "the tiny test base"),
    "tiny-sd3": Recommended(1e-4, 5e-5, 200, "the tiny test base"),
    "sd": Recommended(1e-4, 5e-5, 1500, "Stable Diffusion bases"),
}
PRODIGY_MULTIPLIER = 1.0
# The fields that 0 leaves to the recommendation, with the plan's word for each.
AUTO_FIELDS = {"learning_rate": "learning rate", "text_encoder_learning_rate": "text encoder",
               "max_steps": "steps"}


def recommended_for(base: str, optimizer: str = "adamw") -> Recommended:
    """The recommendation for `base` (a built-in name, else any Stable Diffusion base)."""
    chosen = RECOMMENDED.get(base, RECOMMENDED["sd"])
    if optimizer == "prodigy":
        return replace(chosen, learning_rate=PRODIGY_MULTIPLIER,
                       text_encoder_learning_rate=PRODIGY_MULTIPLIER)
    return chosen


def with_recommended(config: JobConfig) -> JobConfig:
    """`config` with each field of AUTO_FIELDS that is 0 set to the base's recommendation."""
    train = config.train
    chosen = recommended_for(config.model.base, train.optimizer)
    filled = {name: getattr(chosen, name) for name in AUTO_FIELDS if not getattr(train, name)}
    return replace(config, train=replace(train, **filled)) if filled else config


def plan_line(config: JobConfig) -> str:
    """'learning rate 5e-4, text encoder 2e-3, 300 steps (recommended for the toy base; set
    train.learning_rate, ... to change)'; a value set to something else is named as such."""
    resolved = with_recommended(config)
    chosen = recommended_for(config.model.base, config.train.optimizer)
    names = [n for n in AUTO_FIELDS
             if n != "text_encoder_learning_rate" or config.lora.train_text_encoder]
    same = [n for n in names if getattr(resolved.train, n) == getattr(chosen, n)]
    parts = [_value(n, getattr(resolved.train, n)) for n in same]
    if same:
        parts[-1] += (f" (recommended for {chosen.base}; set "
                      + ", ".join(f"train.{n}" for n in same) + " to change)")
    parts += [f"{_value(n, getattr(resolved.train, n))} (train.{n}; recommended for "
              f"{chosen.base}: {_number(getattr(chosen, n))})" for n in names if n not in same]
    return ", ".join(parts)


def _value(name: str, value: float) -> str:
    if name == "max_steps":
        return f"{value} steps"
    return f"{AUTO_FIELDS[name]} {_number(value)}"


def _number(value: float) -> str:
    """5e-4, 2.5e-4, 1, 300: as a person writes a learning rate."""
    if isinstance(value, int) or value >= 0.01:
        return f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
