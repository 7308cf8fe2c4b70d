"""What a `--base` names, decided without loading anything: a built-in, a folder, a file or a hub id.

Kept free of torch and diffusers so that the app and `sd-lora check` can judge a name quickly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sd_lora.errors import UserError
from sd_lora.util import pickles

BUILTIN_BASES = ("toy", "tiny", "tiny-sdxl", "tiny-sd3")
RANDOM_BASES = ("tiny", "tiny-sdxl", "tiny-sd3")  # random weights, for tests: their images are noise
SINGLE_FILE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = pickles.PICKLE_SUFFIXES
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
HUB_PREFIX = "hf://"  # `hf://org/name`: a hub id only, never a local path
HUB_PROBE_TIMEOUT_S = 10
ACCEPTED_FORMS = (
    '"toy" (the built-in toy-world model); "tiny", "tiny-sdxl" or "tiny-sd3" (built-in random '
    "test models); a diffusers folder (SD 1.x, 2.x, SDXL or SD3/3.5) containing "
    "model_index.json; "
    'a Hugging Face hub id such as "runwayml/stable-diffusion-v1-5" ("hf://org/name": never '
    "a local path); "
    "or a single-file SD 1.x/2.x/SDXL/SD3.5 checkpoint ending in .safetensors"
)


class BaseModelError(UserError):
    """A base model that cannot be found or loaded; the message says what to do."""


def base_kind(base: str) -> str:
    """What `base` names, without loading anything: a built-in's name ("toy", "tiny", ...),
    "folder", "file" or "hub";
    raises BaseModelError for a path that does not exist or a name of no accepted form."""
    base = os.fspath(base)
    path = Path(base).expanduser()
    if base in BUILTIN_BASES:
        return base
    if base.startswith(HUB_PREFIX):  # before any look at the disk
        if HUB_ID.match(hub_repo_id(base)):
            return "hub"
        raise BaseModelError(f"base {base!r}: give an org/name hub id after {HUB_PREFIX}")
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES + PICKLE_SUFFIXES:
        raise BaseModelError(f"base {base!r}: no such file")
    if HUB_ID.match(base):
        return "hub"
    raise BaseModelError(
        f"base {base!r} is not an existing file or folder, nor an org/name hub id"
        f"{builtin_suggestion(base) or '.'} Accepted: {ACCEPTED_FORMS}"
    )


# The pipeline class a diffusers folder's model_index.json names -> the family it trains as.
PIPELINE_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "StableDiffusionXLPipeline": "sdxl"}
BUILTIN_FAMILIES = {"toy": "sd1", "tiny": "sd1", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3"}


def declared_family(base: str) -> str | None:
    """The family a built-in or a diffusers folder declares, without loading it ("sd3",
    "sdxl", "sd1"; None when it takes a load to know: SD 1.x vs 2.x, files, hub ids), so that
    settings the family cannot use are refused before minutes of loading."""
    import json

    if base in BUILTIN_FAMILIES:
        return BUILTIN_FAMILIES[base]
    index = Path(os.fspath(base)).expanduser() / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return PIPELINE_FAMILIES.get(name)


def builtin_suggestion(base: str) -> str:
    """'; did you mean 'toy'?' for a near miss of a built-in base's name ("Toy", "tiny_sdxl",
    "toys"), else ''. Built-in names are exact (lower-case): "Toy" could be a folder's name."""
    import difflib

    folded = base.strip().lower().replace("_", "-")
    close = [name for name in BUILTIN_BASES if name == folded]
    close = close or difflib.get_close_matches(folded, BUILTIN_BASES, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def hub_cache_dir() -> Path:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return flag.upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def hub_repo_id(base: str) -> str:
    """`org/name` of a hub id, written `org/name` or `hf://org/name`."""
    return base.removeprefix(HUB_PREFIX)
