"""Generate captioned toy-world datasets: coloured shapes on a coloured background, in a style.

    python datasets/make_sample.py --toy                      # -> datasets/toy/ (every style)
    python datasets/make_sample.py --style stripes            # -> datasets/sample_stripes/
    python datasets/make_sample.py --style plain --count 64 --size 64 --out /tmp/plain

The world and its styles live in `sd_lora.world` (the toy base was pretrained on it). Image i is
the same scene in every style: `plain` and `stripes` with one seed are pairs that differ only in
the style, and a style's trigger word starts the caption:
"zkstripes, two red circles and a yellow square on a blue background".

The output is ours, released under CC0 (see datasets/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sd_lora.world.datasets import write_dataset, write_toy_datasets
from sd_lora.world.scenes import make_example
from sd_lora.world.styles import STYLES

__all__ = ["STYLES", "main", "make_example", "write_dataset"]
HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", action="store_true", help="write every toy style dataset")
    parser.add_argument("--style", choices=sorted(STYLES), default="plain")
    parser.add_argument("--count", type=int, default=16, help="number of images (default 16)")
    parser.add_argument(
        "--size", type=int, default=128, help="width = height in pixels (default 128)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, help="output folder (default datasets/sample_<style>, or datasets/toy)"
    )
    args = parser.parse_args(argv)
    if args.toy:
        out = args.out or HERE / "toy"
        for folder in write_toy_datasets(out):
            print(f"wrote {folder}")
        return 0
    if args.count < 1 or args.size < 8:
        parser.error(f"--count must be >= 1 and --size >= 8 (got {args.count}, {args.size})")
    out = args.out or HERE / f"sample_{args.style}"
    write_dataset(out, STYLES[args.style], args.count, args.size, args.seed)
    print(f"wrote {args.count} {args.style} images ({args.size}x{args.size}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
