"""The real CLIP tokenizers, from files kept in the package (so no hub download is needed):
what every SD 1.x / 2.x / SDXL base uses, built-in or not."""

from __future__ import annotations

from importlib import resources

from transformers import CLIPTokenizer


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer, from the files derived by scripts/derive_clip_tokenizer.py."""
    path = resources.files("sd_lora") / "assets" / "clip_tokenizer"
    return CLIPTokenizer.from_pretrained(str(path))


def open_clip_tokenizer() -> CLIPTokenizer:
    """SD 2.x's tokenizer: the same BPE vocabulary as CLIP, padding with "!" (id 0) like OpenCLIP."""
    tokenizer = clip_tokenizer()
    tokenizer.pad_token = "!"
    return tokenizer
