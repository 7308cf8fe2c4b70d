"""bench/gpu_check.py stays runnable without a GPU: its --dry-run runs the real command on the
tiny base for every row, and the rows a CPU cannot run are refused by the command itself."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_runs_every_row_and_reports_figures(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--only", "sd15",
         "--work", str(tmp_path), "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    assert set(rows) == {"fp16", "bf16", "bf16 + checkpointing", "bf16 + 8-bit AdamW",
                         "fp16 + 8-bit AdamW + checkpointing"}
    for name in ("bf16", "bf16 + checkpointing"):  # trained: figures from its timing.json
        row = rows[name]
        assert row["s_per_step"] > 0 and row["images_per_s"] > 0 and row["peak_gib"] > 0
        assert row["estimate_gib"] > 0 and row["attention"]
    for name in ("fp16", "bf16 + 8-bit AdamW", "fp16 + 8-bit AdamW + checkpointing"):
        assert rows[name]["note"] == "refused on CPU, as it should be"
    assert "| tiny | bf16 |" in done.stdout  # the table a person reads
