"""`timing.json`: where a run's time and memory went, so a user sees what to change.

    {"total_s": 100.1, "phases_s": {"model": 0.6, "evaluation": 0.5, "training": 60.7,
     "samples": 1.5, "export": 0.0, "report": 38.8}, "steps": {"count": 300,
     "median_s_per_step": 0.19, "first_step_s": 0.4}, "peak_rss_gib": 1.1, ...}

The phases are the console's (`sd_lora.util.phases`); the steps' times are the loop's, from the
end of one optimizer step to the end of the next (the first counted from the loop's start: it
includes warm-up, so the median leaves it out).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
from pathlib import Path

import torch

from sd_lora.util.atomic import write_bytes_atomically
from sd_lora.util.phases import PhaseClock

GIB = 2**30


def peak_rss_gib() -> float:
    """This process's largest resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (GIB if sys.platform == "darwin" else GIB / 1024)


def timing_record(clock: PhaseClock, step_seconds: list[float], device: torch.device,
                  mixed_precision: str) -> dict:
    later = step_seconds[1:]
    record = {
        "total_s": round(clock.elapsed, 2),
        "phases_s": {name: round(s, 2) for name, s in clock.seconds.items()},
        "steps": {
            "count": len(step_seconds),
            "median_s_per_step": round(statistics.median(later), 4) if later else None,
            "first_step_s": round(step_seconds[0], 4) if step_seconds else None,
        },
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "peak_cuda_gib": (round(torch.cuda.max_memory_allocated(device) / GIB, 3)
                          if device.type == "cuda" else None),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "mixed_precision": mixed_precision,
    }
    return record


def timing_line(record: dict) -> str:
    """One console line: the total, the longest phases and the step time."""
    phases = sorted(record["phases_s"].items(), key=lambda kv: -kv[1])
    parts = ", ".join(f"{name} {s:.1f}" for name, s in phases if s >= 0.05)
    step = record["steps"]["median_s_per_step"]
    per_step = f"; {step:.3f} s/step (median)" if step is not None else ""
    return (f"time: {record['total_s']:.0f} s in all ({parts} s){per_step}; peak memory "
            f"{record['peak_rss_gib']:.2f} GiB RAM (timing.json)")


def write_timing(output_dir: Path, record: dict) -> Path:
    return write_bytes_atomically(Path(output_dir) / "timing.json",
                                  (json.dumps(record, indent=2) + "\n").encode())
