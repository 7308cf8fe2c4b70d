"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) offline.

transformers ships no CLIP vocabulary and nothing may be downloaded at run time, so the
vocabulary is rebuilt from `open_clip/bpe_simple_vocab_16e6.txt.gz`, the merge list OpenAI
published with CLIP (also inside the open-clip-torch wheel). We never install that package:

    pip download --no-deps open-clip-torch -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python scripts/derive_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

The ids follow the construction in OpenAI's CLIP: the 256 byte symbols, the same with the
end-of-word marker, one token per merge (in merge order), then the two special tokens.
That gives 49,408 tokens and 48,894 merges, the sizes every SD 1.x/2.x text encoder expects.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "sd_lora" / "assets" / "clip_tokenizer"
N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary budget less the byte symbols and specials


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP use for raw bytes, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in sorted(printable) + [b for b in range(256) if b not in printable]]


def derive(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]  # line 0 is a version header
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != 49408 or len(merges) != 48894:
        raise SystemExit(f"unexpected sizes: {len(vocab)} tokens, {len(merges)} merges")
    return vocab, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    vocab, merges = derive(args.bpe_gz)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (args.out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
