"""`.ckpt` / `.pt` / `.pth` / `.bin` files, only when the user opts in, and then only tensors.

A pickle can run any code when it is opened, so sd-lora refuses these files unless asked
(`--allow-pickle`, `model.allow_pickle = true`). Even then it loads them with
`torch.load(weights_only=True)`, whose unpickler builds tensors and plain containers only: a file
that asks for anything else (a class, a function call) is refused, not run. The app never opens
pickles.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ALLOW_HINT = "pass --allow-pickle (or set model.allow_pickle = true) if you trust the file"


class PickleRefused(ValueError):
    """A pickle file that was not opened, or that holds more than tensors; names the file."""


def is_pickle(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refusal(path: str | os.PathLike, what: str) -> PickleRefused:
    suffix = Path(path).suffix
    return PickleRefused(
        f"{path}: {suffix} {what} are Python pickles, which can run code when loaded, so they "
        f"are not opened. Convert it to .safetensors with a tool you trust, or {ALLOW_HINT}: "
        "it is then read with torch.load(weights_only=True), which builds tensors only."
    )


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a pickled state dict (a Lightning/LDM checkpoint's nested "state_dict"
    too), through torch's weights-only unpickler; refuses anything that is not tensors."""
    path = Path(path)
    if not path.is_file():
        raise PickleRefused(f"{path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        raise PickleRefused(
            f"{path}: refused by the weights-only unpickler, which would not build what the file "
            f"asks for ({str(e).splitlines()[0][:300]}); it is not a plain state dict, or it is "
            "a file that tries to run code"
        ) from None
    except Exception as e:  # truncated or not a torch file at all
        raise PickleRefused(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from e
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise PickleRefused(f"{path}: holds a {type(loaded).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise PickleRefused(f"{path}: no tensors in it (keys: {list(loaded)[:5]})")
    return tensors
