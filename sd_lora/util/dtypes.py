"""The one table of dtype names: export.dtype, the tools' --dtype and train.mixed_precision."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights are loaded in under train.mixed_precision ("no": fp32)."""
    return DTYPES["fp32" if mixed_precision == "no" else mixed_precision]
