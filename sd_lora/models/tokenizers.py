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


# A small T5 vocabulary for the built-in tiny SD3 base: T5's special tokens (ids 0-2 as in T5),
# then every printable ASCII character with and without SentencePiece's word-start mark "▁",
# then common whole words. Any English caption tokenizes (unknown words fall back to
# characters), as with T5's real 32k vocabulary, which a real SD3 base brings in its folder.
T5_SPECIALS = (("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0))
T5_WORDS = ("a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "style",
            "red", "green", "blue", "yellow", "white", "black", "circle", "circles", "square",
            "squares", "triangle", "background", "two", "three", "one")


def tiny_t5_vocabulary() -> list[tuple[str, float]]:
    """(piece, log-probability) pairs: whole words score above single characters, so the
    Unigram model prefers them, as SentencePiece's trained scores would."""
    chars = [chr(c) for c in range(33, 127)]
    pieces = [(f"▁{w}", -2.0) for w in T5_WORDS]
    pieces += [("▁", -6.0)] + [(f"▁{c}", -7.0) for c in chars] + [(c, -8.0) for c in chars]
    return list(T5_SPECIALS) + pieces


def tiny_t5_tokenizer():
    """A working T5 tokenizer (Unigram, "▁" word starts, `</s>` appended, `<pad>` = 0) over
    `tiny_t5_vocabulary`, built in memory: no SentencePiece model file is needed."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=tiny_t5_vocabulary(), extra_ids=0, model_max_length=256)
