"""The values a config may name: LoRA target groups, optimizers and their learning-rate ranges,
and the small syntaxes of pattern and optimizer-argument lists.

They live apart from the code that acts on them (`sd_lora.lora.inject`, `sd_lora.train.optimizers`)
so that reading and checking a config needs neither torch nor PEFT.
"""

from __future__ import annotations

import ast
import re

from sd_lora.errors import UserError

# Target groups a user names in the config, and the module-name suffixes each one covers.
UNET_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),  # self- and cross-attention projections
    "proj": ("proj_in", "proj_out"),  # the transformer blocks' in/out projections
    "ff": ("ff.net.0.proj", "ff.net.2"),  # the transformer blocks' feed-forward
    # LoCon: the ResNet blocks (3x3 convs, their 1x1 shortcut and time projection) and the
    # down/upsampling convs, the layers sd-scripts adapts with conv_dim.
    "conv": ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
             "upsamplers.0.conv"),
}
CONV_GROUPS = ("conv",)  # groups whose k x k convolutions get LoRA (the rest: 1x1 and Linear)
TEXT_ENCODER_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "mlp": ("fc1", "fc2"),
}
# SD3's MMDiT: joint attention over the image stream (to_q/k/v, to_out.0; SD3.5 Medium's extra
# self-attention attn2 too) and the text stream (add_*_proj, to_add_out), each stream's
# feed-forward, and the adaLN modulation that reads the timestep and pooled text.
TRANSFORMER_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
    "ff": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    "adaln": ("norm1.linear", "norm1_context.linear"),
}
TARGET_GROUPS = {
    "unet": UNET_TARGET_GROUPS,
    "transformer": TRANSFORMER_TARGET_GROUPS,
    "text_encoder": TEXT_ENCODER_TARGET_GROUPS,
    "text_encoder_2": TEXT_ENCODER_TARGET_GROUPS,
}

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
# The learning rates each optimizer takes: Prodigy's is a multiplier of its own estimate.
LEARNING_RATE_RANGE = {"prodigy": (0.0, 10.0)}
DEFAULT_RANGE = (0.0, 1.0)


class OptimizerError(UserError):
    """An optimizer that cannot be built as configured; the message names the field."""


def parse_patterns(items, field: str, kind=int) -> dict[str, float]:
    """["regex=value", ...] (lora.rank_pattern / alpha_pattern) -> {regex: value}."""
    patterns = {}
    for item in items:
        pattern, sep, value = str(item).rpartition("=")
        try:
            patterns[pattern] = kind(value)
            re.compile(pattern)
        except (ValueError, re.error) as e:
            raise ValueError(f"{field} entry {item!r}: expected regex=value ({e})") from None
        if not sep or not pattern or patterns[pattern] <= 0:
            raise ValueError(f"{field} entry {item!r}: expected regex=value with a positive value")
    return patterns


def parse_optimizer_args(items) -> dict[str, object]:
    """["key=value", ...] -> {key: value}, values read as Python/TOML literals when they are
    (numbers, true/false, tuples), else kept as text."""
    kwargs: dict[str, object] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise OptimizerError(f"train.optimizer_args entry {item!r} is not key=value")
        text = raw.strip()
        lowered = {"true": "True", "false": "False", "none": "None"}.get(text.lower(), text)
        try:
            value = ast.literal_eval(lowered)
        except (ValueError, SyntaxError):
            value = text
        kwargs[key.strip()] = value
    return kwargs
