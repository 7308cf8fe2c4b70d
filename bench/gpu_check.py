"""The `sd-lora train` command on a GPU: full SD 1.5 and SDXL architectures, every precision path.

    python bench/gpu_check.py                 # on a CUDA machine: about 6 minutes on one H100
    python bench/gpu_check.py --dry-run       # on a CPU: the same rows on the tiny bases
    python bench/gpu_check.py --json out.json --only sd15

It builds the bases with random weights from the bundled configs (nothing is downloaded; speed
and memory do not depend on the weight values) and saves each once as a diffusers folder, makes
a folder of captioned images at each base's size, then runs the real command, one process per
row, exactly as a user would (`python -m sd_lora train ...`):

| row | what it shows |
|---|---|
| fp16 | fp16 autocast with Accelerate's loss scaler (the VAE kept in fp32) |
| bf16 | bf16 autocast, no scaler |
| bf16 + checkpointing | train.gradient_checkpointing: activations recomputed in the backward |
| bf16 + 8-bit AdamW | train.optimizer = "adamw8bit" (bitsandbytes) |
| fp16 + 8-bit AdamW + checkpointing | all the memory savers at once |

on SD 1.5 at 512 px (batch 4) and SDXL at 1024 px (batch 2), with the command's defaults
otherwise (UNet and text-encoder LoRA, latents cached), no sample images, no report. Each row
reports s/step (the median from the run's timing.json), images/s, the peak GPU memory beside
the trainer's own memory estimate for that row (`sd_lora.train.memory.estimate`), and the
attention kernel PyTorch's scaled_dot_product_attention picks for the UNet's attention shapes in
that dtype. A row that fails is reported with the end of its output; the others still run.

`--dry-run` runs the same rows on the built-in `tiny` and `tiny-sdxl` bases (saved as folders
the same way) at 64 px on the CPU, so CI keeps this script working. There the rows a CPU cannot run (fp16, 8-bit AdamW) must
be refused by the command's own checks before any model loads, and the script checks that they
are. Exit status: 0 when every row did what it should, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sd_lora.models.load import load_pipeline  # noqa: E402
from sd_lora.train.memory import count_folder, estimate  # noqa: E402

IMAGES = 8


@dataclass(frozen=True)
class Row:
    name: str
    mixed_precision: str
    optimizer: str
    checkpointing: bool

    def needs_cuda(self) -> bool:
        return self.mixed_precision == "fp16" or self.optimizer == "adamw8bit"


ROWS = (
    Row("fp16", "fp16", "adamw", False),
    Row("bf16", "bf16", "adamw", False),
    Row("bf16 + checkpointing", "bf16", "adamw", True),
    Row("bf16 + 8-bit AdamW", "bf16", "adamw8bit", False),
    Row("fp16 + 8-bit AdamW + checkpointing", "fp16", "adamw8bit", True),
)


@dataclass(frozen=True)
class Base:
    name: str
    family: str  # what --only names
    resolution: int
    batch: int
    steps: int


BASES = (Base("sd15", "sd15", 512, 4, 12), Base("sdxl", "sdxl", 1024, 2, 10))
DRY_BASES = (Base("tiny", "sd15", 64, 2, 3), Base("tiny-sdxl", "sdxl", 64, 2, 3))


@dataclass
class Result:
    base: str
    row: str
    ok: bool
    s_per_step: float | None = None
    images_per_s: float | None = None
    peak_gib: float | None = None  # GPU memory on CUDA, the process's RAM on a CPU
    estimate_gib: float | None = None
    attention: str = ""
    wall_s: float = 0.0
    note: str = ""


def build_folder(base: Base, work: Path) -> str:
    """The base as `--base` takes it: a diffusers folder of random weights (saved in fp16,
    which halves the writing; training loads it in its own dtype). The dry run's tiny bases are
    saved the same way, so that both runs take the same loading path."""
    folder = work / f"{base.name}-random"
    if not (folder / "model_index.json").is_file():
        started = time.perf_counter()
        if base.name.startswith("tiny"):
            pipe = load_pipeline(base.name)
        else:
            sys.path.insert(0, str(REPO / "bench"))
            from train_speed import build_sd15_pipeline, build_sdxl_pipeline

            pipe = (build_sdxl_pipeline if base.name == "sdxl" else build_sd15_pipeline)("fp16")
        pipe.to(torch.float16).save_pretrained(folder)
        del pipe
        print(f"[{base.name}] random-weight folder written in {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)
    return str(folder)


def make_data(resolution: int, work: Path) -> Path:
    """IMAGES smooth random-colour images with captions, at `resolution`."""
    folder = work / f"data-{resolution}"
    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((resolution, resolution), Image.BICUBIC)
        image.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"zkcheck, a colour field number {i}")
    return folder


def attention_kernel(base_path: str, dtype: torch.dtype, resolution: int, device: str) -> str:
    """The kernel scaled_dot_product_attention picks for the UNet's first attention layer
    (its heads, head size and token count) in `dtype` on `device`: PyTorch's own choice."""
    config = json.loads(Path(base_path, "unet", "config.json").read_text())
    heads = config["attention_head_dim"]
    levels = [i for i, kind in enumerate(config["down_block_types"]) if "CrossAttn" in kind]
    level = levels[0] if levels else 0
    heads = heads[level] if isinstance(heads, (list, tuple)) else heads
    channels = config["block_out_channels"][level]
    tokens = (resolution // 8 // 2 ** level) ** 2
    q = torch.randn(1, heads, tokens, channels // heads, dtype=dtype, device=device)
    try:
        choice = torch._fused_sdp_choice(q, q, q)  # the dispatcher's own pick
        return torch.nn.attention.SDPBackend(choice).name.lower()
    except Exception as e:  # a private function: say so rather than guess
        return f"unknown ({type(e).__name__})"


def run_row(base: Base, base_path: str, data: Path, row: Row, work: Path, dry: bool,
            device: str) -> Result:
    out = work / "runs" / f"{base.name}-{row.name.replace(' ', '').replace('+', '-')}"
    command = [
        sys.executable, "-m", "sd_lora", "train", "--base", base_path, "--data", str(data),
        "--resolution", str(base.resolution), "--max-steps", str(base.steps),
        "--mixed-precision", row.mixed_precision, "--output", str(out), "--name", "check",
        "--no-progress",
        "--set", f"train.batch_size={base.batch}", "--set", f'train.optimizer="{row.optimizer}"',
        "--set", f"train.gradient_checkpointing={str(row.checkpointing).lower()}",
        "--set", "sample.enabled=false", "--set", "report.enabled=false",
        "--set", "train.checkpoint_every=0", "--set", 'data.cache_latents="memory"',
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    wall = time.perf_counter() - started
    result = Result(base.name, row.name, False, wall_s=round(wall, 1))
    output = done.stdout + done.stderr
    if dry and row.needs_cuda():
        # On a CPU the command must refuse these before loading anything.
        refusals = ("'fp16' needs a CUDA GPU", "'adamw8bit' needs bitsandbytes")
        said = any(text in output for text in refusals)
        result.ok = done.returncode != 0 and said and "model: done" not in output
        result.note = "refused on CPU, as it should be" if result.ok else _tail(output)
        return result
    timing_file = out / "timing.json"
    if done.returncode != 0 or not timing_file.is_file():
        result.note = f"exit {done.returncode}: {_tail(output)}"
        return result
    timing = json.loads(timing_file.read_text())
    step = timing["steps"]["median_s_per_step"]
    result.ok = step is not None
    result.s_per_step = step
    result.images_per_s = round(base.batch / step, 2) if step else None
    result.peak_gib = timing["peak_cuda_gib"] if device == "cuda" else timing["peak_rss_gib"]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[row.mixed_precision]
    result.attention = attention_kernel(base_path, dtype, base.resolution, device)
    result.estimate_gib = round(_estimate(base_path, base, row), 2)
    return result


def _estimate(base_path: str, base: Base, row: Row) -> float:
    guess = estimate(count_folder(Path(base_path)), base.resolution, base.batch,
                     row.mixed_precision, row.checkpointing, cached_latents=True,
                     available=(None, ""))
    return guess.total_gib


def _tail(text: str, lines: int = 4) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def table(results: list[Result], device: str) -> str:
    memory = "peak VRAM GiB" if device == "cuda" else "peak RSS GiB"
    head = (f"| base | row | s/step | images/s | {memory} | estimate GiB | attention | wall s | "
            "note |\n|---|---|---|---|---|---|---|---|---|")
    rows = [
        f"| {r.base} | {r.row} | {_fmt(r.s_per_step, 3)} | {_fmt(r.images_per_s, 2)} | "
        f"{_fmt(r.peak_gib, 2)} | {_fmt(r.estimate_gib, 2)} | {r.attention or '-'} | "
        f"{r.wall_s:.0f} | {r.note or ('ok' if r.ok else 'failed')} |"
        for r in results
    ]
    return "\n".join([head, *rows])


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the tiny bases at 64 px on the CPU (what CI runs)")
    parser.add_argument("--only", choices=["sd15", "sdxl"], help="one base only")
    parser.add_argument("--work", type=Path, help="where folders, data and runs go (default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--json", type=Path, help="also write the rows and the machine here")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        print("no CUDA GPU here: run with --dry-run for the CPU check", file=sys.stderr)
        return 2
    bases = DRY_BASES if args.dry_run else BASES
    bases = [b for b in bases if args.only in (None, b.family)]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = args.work or Path(tmp)
        results = []
        for base in bases:
            base_path = build_folder(base, work)
            data = make_data(base.resolution, work)
            for row in ROWS:
                print(f"[{base.name}] {row.name} ...", file=sys.stderr, flush=True)
                results.append(run_row(base, base_path, data, row, work, args.dry_run, device))
                print(f"  {asdict(results[-1])}", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}\n")
    print(table(results, device))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                         "rows": [asdict(r) for r in results]}, indent=1))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
