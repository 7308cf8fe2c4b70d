"""`sd-lora train` beside its peers (sd-scripts, diffusers' example), timed as whole commands.

    TOKENIZER_DIR=$PWD/sd_lora/assets/clip_tokenizer bash ../shared/peerbench/setup.sh  # once
    .venv/bin/python bench/peers.py                       # bf16 and fp32, 256 px, 8 steps
    .venv/bin/python bench/peers.py --precisions bf16 --res 512

It runs the shared harness (`../shared/peerbench/run_bench.py`, its README says what each column
measures) with the peers' rows and one row of ours: the exact command a user runs, with the
flags that ask for the work the peers do (no sample images worth the name, no quality report,
no checkpoints; LoRA on the UNet's attention only, rank 16, batch 1). Where our time went is in
each run's timing.json (under the harness's results folder). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HARNESS = Path(os.environ.get("PEERBENCH", REPO.parent / "shared" / "peerbench")) / "run_bench.py"
PEERS = "diffusers-bf16,diffusers-fp32,sdscripts-bf16,sdscripts-fp32,sdscripts-bf16-cache"
OURS = (
    f"{REPO / '.venv' / 'bin' / 'sd-lora'} train --base {{model}} --data {{data_plain}} "
    "--resolution {res} --max-steps {steps} --seed {seed} --mixed-precision {mp} --output {out} "
    "--name bench --set lora.unet_r={rank} --set lora.unet_alpha={rank} "
    "--set lora.train_text_encoder=false --set train.batch_size=1 --set train.learning_rate={lr} "
    "--set sample.enabled=false --set report.enabled=false "
    "--set train.checkpoint_every=0"
)
PROGRESS = r"training:\s+\d+%\|[^|]*\|\s*(\d+)/\d+"  # our bar: "training:  50%|...| 4/8"


def command(args: argparse.Namespace) -> list[str]:
    rows = ["--custom", f"sdlora::{OURS}", "--custom-regex", f"sdlora::{PROGRESS}"]
    for name, flags in (("sdlora-nocache", "--set data.cache_latents=\"none\""),):
        if args.with_uncached:
            rows += ["--custom", f"{name}::{OURS} {flags}", "--custom-regex", f"{name}::{PROGRESS}"]
    return [sys.executable, str(HARNESS), "--precisions", args.precisions, "--configs",
            args.configs, "--res", str(args.res), "--steps", str(args.steps), *rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--configs", default=PEERS, help="the harness's peer rows")
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--with-uncached", action="store_true",
                        help="also a row with data.cache_latents = 'none'")
    parser.add_argument("--dry-run", action="store_true", help="print the harness command only")
    args = parser.parse_args()
    cmd = command(args)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    if not HARNESS.is_file():
        print(f"no harness at {HARNESS}: set PEERBENCH to the peerbench folder", file=sys.stderr)
        return 2
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
