"""The process of one training job started from the app's Train tab:

    python -m sd_lora_app.job_process RUN_DIR ADAPTERS_DIR

It is `sd_lora.services.jobs.run_job` with the toy world's style scorer for the quality report,
which the services layer cannot import itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sd_lora.services.jobs import run_job
from sd_lora.util.malloc import keep_freed_memory
from sd_lora.world.scorer import toy_style_scorer

if __name__ == "__main__":
    keep_freed_memory()  # this process trains one job, then exits
    sys.exit(run_job(Path(sys.argv[1]), Path(sys.argv[2]), style_scorer=toy_style_scorer()))
