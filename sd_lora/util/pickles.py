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
import re
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ALLOW_FLAG = "--allow-pickle"  # every command that reads a model or adapter file takes it


class PickleRefused(ValueError):
    """A pickle file that was not opened, or that holds more than tensors; names the file."""


def is_pickle(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refusal(path: str | os.PathLike, what: str) -> PickleRefused:
    """Why `path` (a pickle) was not opened, and the ways on: for an adapter, `sd-lora convert`
    turns it into .safetensors once; a base can also be allowed in a job config."""
    path = Path(path)
    if what == "adapters":
        ways = (f"pass {ALLOW_FLAG} if you trust the file, or turn it into .safetensors once: "
                f"sd-lora convert {path} {path.with_suffix('.safetensors')} --to kohya {ALLOW_FLAG}")
    else:
        ways = (f"convert it to .safetensors with a tool you trust, or pass {ALLOW_FLAG} if you "
                "trust the file (model.allow_pickle = true in a job config)")
    return PickleRefused(
        f"{path}: {path.suffix} {what} are Python pickles, which can run code when loaded, so they "
        f"are not opened: {ways}. Allowed, the file is read by "
        "torch.load(weights_only=True), which builds tensors and runs no code."
    )


def _what_was_refused(message: str) -> str:
    """The global torch's weights-only unpickler refused, from its message. That message also
    advises `weights_only=False` (running the file's code) in ANSI bold: none of it is shown."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return (f"the file asks for the Python object {found.group(1)!r}, which is not a tensor "
                "or a plain container")
    after = message.partition("WeightsUnpickler error:")[2].strip().split("\n\n")[0]
    detail = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", after).split())[:200]
    return f"it cannot read the file ({detail})" if detail else "it cannot read the file"


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
            f"{path}: refused by the weights-only unpickler: {_what_was_refused(str(e))}. It is "
            "not a plain state dict saved by torch (a whole pickled object, or a file that tries "
            "to run code); nothing in it was run"
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
