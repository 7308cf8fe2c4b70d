"""What blending costs at generation time: render time with a merged blend versus the base alone,
and the time to switch a blend's weights (what the app does when a slider moves).

    .venv/bin/python bench/app_speed.py                # tiny renders + SD 1.5-architecture merges
    .venv/bin/python bench/app_speed.py --only tiny

Adapters are merged into the base weights (`sd_lora.adapters.apply`), so a blend adds no work per
denoising step by construction; this script measures that claim and the merge cost. Adapters are
random (values do not change timings): UNet attention r=16 and text-encoder attention r=8, like a
typical style LoRA. SD 1.5's architecture is built with random weights from the bundled configs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import build_sd15_pipeline  # noqa: E402  (same SD 1.5 builder as the other bench)

from sd_lora.adapters.apply import apply_adapters, restore  # noqa: E402
from sd_lora.generate.render import RenderSettings, render  # noqa: E402
from sd_lora.lora.inject import add_lora, read_adapter_state  # noqa: E402
from sd_lora.models.builtin.tiny import build_tiny_pipeline  # noqa: E402
from sd_lora.models.families import freeze


def random_adapters(pipe, count: int = 2) -> list:
    """`count` AdapterStates with non-zero weights on UNet (r=16) and text-encoder (r=8)
    attention, made by injecting LoRA into `pipe` (a spare copy of the base) and re-drawing
    lora_B for each."""
    add_lora(pipe.unet, "unet", ("attn",), r=16, alpha=16)
    add_lora(pipe.text_encoder, "text_encoder", ("attn",), r=8, alpha=8)
    states = []
    for seed in range(count):
        torch.manual_seed(seed)
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.data.normal_(0, 0.01)
        states.append(read_adapter_state({"unet": pipe.unet, "text_encoder": pipe.text_encoder},
                                         "sd1"))
    return states


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first calls pay for allocation and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def merge_timings(pipe, adapters, repeats: int) -> dict[str, float]:
    """Merge a 2-adapter blend into the base, change its weights (re-merge), restore the base."""
    entries = [(adapters[0], 0.7, 0.7), (adapters[1], 0.3, 0.3)]
    merges, changes, restores = [], [], []
    for i in range(repeats):
        start = time.perf_counter()
        applied = apply_adapters(pipe, entries)
        merges.append(time.perf_counter() - start)
        w = 0.5 + 0.01 * i
        start = time.perf_counter()
        applied = apply_adapters(pipe, [(adapters[0], w, w), (adapters[1], 1 - w, 1 - w)],
                                 replace=applied)
        changes.append(time.perf_counter() - start)
        start = time.perf_counter()
        restore(pipe, applied)
        restores.append(time.perf_counter() - start)
    return {"merge a blend": statistics.median(merges),
            "change its weights": statistics.median(changes),
            "restore the base": statistics.median(restores)}


def render_timings(pipe, adapters, repeats: int, steps: int, size: int) -> dict[str, float]:
    settings = RenderSettings(prompt="zkstripes, a red circle", seed=1, steps=steps,
                              width=size, height=size)
    base = median_seconds(lambda: render(pipe, settings), repeats)
    applied = apply_adapters(pipe, [(adapters[0], 0.7, 0.7), (adapters[1], 0.3, 0.3)])
    blended = median_seconds(lambda: render(pipe, settings), repeats)
    restore(pipe, applied)
    return {"render, base": base, "render, 2-adapter blend": blended}


def unet_forward_timings(pipe, adapters, repeats: int, size: int) -> dict[str, float]:
    latents = torch.randn(2, 4, size // 8, size // 8)  # CFG batch of 2
    embeddings = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    t = torch.tensor([500, 500])

    @torch.no_grad()
    def forward():
        pipe.unet(latents, t, embeddings)

    base = median_seconds(forward, repeats)
    applied = apply_adapters(pipe, [(adapters[0], 0.7, 0.7), (adapters[1], 0.3, 0.3)])
    blended = median_seconds(forward, repeats)
    restore(pipe, applied)
    return {"UNet step, base": base, "UNet step, 2-adapter blend": blended}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["tiny", "sd15"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows: list[tuple[str, str, float]] = []
    if args.only in (None, "tiny"):
        print("tiny: building ...", file=sys.stderr)
        pipe = freeze(build_tiny_pipeline())
        pipe.set_progress_bar_config(disable=True)
        adapters = random_adapters(build_tiny_pipeline())
        for name, value in {**render_timings(pipe, adapters, args.repeats, 20, 64),
                            **merge_timings(pipe, adapters, args.repeats)}.items():
            rows.append(("tiny", name, value))
    if args.only in (None, "sd15"):
        print("sd15: building the SD 1.5 architecture (random weights) ...", file=sys.stderr)
        pipe = freeze(build_sd15_pipeline("fp32"))
        adapters = random_adapters(build_sd15_pipeline("fp32"))
        for name, value in {**unet_forward_timings(pipe, adapters, args.repeats, 256),
                            **merge_timings(pipe, adapters, 3)}.items():
            rows.append(("sd15 (256 px)", name, value))
    print("| base | measurement | median seconds |\n|---|---|---|")
    for base, name, value in rows:
        print(f"| {base} | {name} | {value:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
