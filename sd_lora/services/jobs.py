"""Training jobs for the app: each one a detached `sd-lora train` process in its own run folder.

    jobs = JobManager(workspace)
    job_id = jobs.start(data_dir, preset_toml("quick", "toy", data_dir, "style"), "style")
    jobs.status(job_id)   # state, step, losses, ETA, samples, adapter: read from files only
    jobs.cancel(job_id)   # SIGINT: the trainer saves a checkpoint and stops

Everything a job's status needs is in `runs/<job id>/` (job.json, job.toml, train.log, loss.csv,
samples/, summary.json, exit.json), so closing the browser or restarting the app loses nothing.
The process runs `python -m sd_lora.services.jobs RUN_DIR ADAPTERS_DIR` (the app: its own module,
which adds a style scorer): `train()` on RUN_DIR/job.toml without progress bars, as
`sd-lora train --config ... --no-progress` would, recording the exit code in exit.json and, on
success, copying the kohya adapter (and a preview) into the adapters folder.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from sd_lora.config import JobConfig, load_config, load_config_text, to_toml
from sd_lora.errors import INTERRUPTED, UserError, exit_status
from sd_lora.generate.render import image_grid
from sd_lora.services.job_guard import guard_job
from sd_lora.services.workspace import Workspace
from sd_lora.train.outputs import adapter_path
from sd_lora.train.recipe import train
from sd_lora.train.recommended import with_recommended
from sd_lora.train.report import StyleScorer
from sd_lora.train.stop_signals import stop_on_sigterm
from sd_lora.util.atomic import atomic_path, write_bytes_atomically

# Dotted overrides of sd_lora.config defaults, per preset. Learning rates and steps left out
# are the base's recommendation (sd_lora.train.recommended). The data.regularization_* settings apply
# only to a job given a regularization folder: without one they would act on nothing.
PRESETS: dict[str, dict] = {
    "quick": {  # the toy base or a first try: minutes on a CPU (= examples/demo.toml, tested)
        "lora.unet_r": 8, "lora.unet_alpha": 8.0, "lora.text_encoder_r": 4,
        "lora.text_encoder_alpha": 4.0, "train.batch_size": 4,
        "train.min_snr_gamma": 5.0, "train.noise_offset": 0.1,
        "train.checkpoint_every": 100, "sample.every": 100,
        "data.regularization_weight": 10.0, "data.regularization_caption_dropout": 0.2,
        "data.regularization_target": "base", "export.formats": ["kohya", "diffusers"],
    },
    "standard": {  # an SD 1.x/2.x style LoRA on a GPU
        "lora.unet_r": 16, "lora.unet_alpha": 8.0, "lora.text_encoder_r": 8,
        "lora.text_encoder_alpha": 4.0, "train.max_steps": 1500, "train.batch_size": 2,
        "train.gradient_accumulation_steps": 2, "train.learning_rate": 1e-4,
        "train.text_encoder_learning_rate": 5e-5, "train.lr_scheduler": "cosine",
        "train.lr_warmup_steps": 100, "train.checkpoint_every": 250, "sample.every": 250,
        "sample.steps": 25,
    },
}  # fmt: skip
STATES = ("running", "done", "failed", "cancelled")
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
JOB_TOML_HEADER = (
    "# Written by the sd-lora app when the job started; this is exactly what runs.\n"
    "# Continue a cancelled job: sd-lora train --config job.toml --resume\n"
)


class JobError(UserError):
    """A job request or job id that cannot be used; the message names it."""


@dataclass
class JobStatus:
    job_id: str
    name: str
    state: str  # running | done | failed | cancelled
    step: int
    max_steps: int
    eta_seconds: float | None
    losses: list[tuple[int, float]]
    samples: list[Path]
    adapter: Path | None
    message: str


def _toml_literal(value) -> str:
    return json.dumps(value)  # JSON strings, numbers, booleans and lists are valid TOML


def preset_toml(preset: str, base: str, data_dir, name: str, overrides=(),
                regularization="") -> str:
    """A complete job TOML for `preset` (validated); `overrides` are more `field=value` items;
    `regularization` a folder of regularization images (the app gives the toy world's plain
    scenes on the toy base, as the demo trains with), else none."""
    if preset not in PRESETS:
        raise JobError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    _check_name(name)
    settings = {k: v for k, v in PRESETS[preset].items()
                if regularization or not k.startswith("data.regularization_")}
    items = [f"{k}={_toml_literal(v)}" for k, v in settings.items()]
    items += [f"model.base={_toml_literal(str(base))}", f"data.path={_toml_literal(str(data_dir))}",
              f"train.name={_toml_literal(name)}", f"train.output_dir={_toml_literal('runs/' + name)}"]
    if regularization:
        items.append(f"data.regularization={_toml_literal(str(regularization))}")
    config = load_config(None, items + list(overrides))
    return (f"# sd-lora job, preset {preset!r}. When the app starts it, train.output_dir, data.path\n"
            f"# and train.name are set from the job's own settings, and every path must be inside\n"
            f"# the app's folders (a relative one is taken from its runs folder).\n" + to_toml(config))


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not JOB_NAME.match(name):
        raise JobError(
            f"name {name!r}: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=1))


def _write_text(path: Path, text: str) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    write_bytes_atomically(path, text.encode("utf-8"))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


class JobManager:
    def __init__(self, workspace: Workspace, max_running: int = 1,
                 extra_env: dict[str, str] | None = None, job_module: str = __name__) -> None:
        """`job_module`: what `python -m` runs for a job (its RUN_DIR and ADAPTERS_DIR as
        arguments); the app gives one that adds its style scorer to `run_job`."""
        self.workspace = workspace
        self.job_module = job_module
        self.max_running = max_running  # one at a time by default: jobs share one CPU/GPU
        # e.g. {"OMP_NUM_THREADS": "1"}: on a busy 2-core CPU, torch's default of one thread per
        # core oversubscribes it (a 3-step tiny job took 157 s instead of 14 s, measured).
        self.extra_env = dict(extra_env or {})
        self._start_lock = threading.Lock()  # two quick clicks must not start two jobs
        self._processes: dict[str, subprocess.Popen] = {}  # started here: polled, so reaped

    # --- start ---------------------------------------------------------------------------------

    def start(self, data_dir: Path, toml_text: str, name: str) -> str:
        """Validate everything, then launch the job; returns its id (the run folder's name)."""
        with self._start_lock:
            return self._start(Path(data_dir), toml_text, name)

    def _start(self, data_dir: Path, toml_text: str, name: str) -> str:
        _check_name(name)
        data = Path(data_dir).resolve()
        if not self.workspace.contains(data) or not data.is_dir():
            raise JobError(
                f"data folder {data_dir} must be a folder inside the workspace (an uploaded zip "
                f"is unpacked into {self.workspace.runs / 'uploads'})"
            )
        target = self.workspace.resolve("adapters", f"{name}.safetensors")
        if target.exists():
            raise JobError(f"{target} already exists; choose another name for this job")
        running = [j.job_id for j in self.list_jobs() if j.state == "running"]
        if len(running) >= self.max_running:
            raise JobError(f"job {running[0]} is still running; wait for it or cancel it first")
        config = self.job_config(toml_text, data, name)
        run_dir, job_id = self._new_run_dir(name)
        config = replace(config, train=replace(config.train, output_dir=str(run_dir)))
        _write_text(run_dir / "job.toml", JOB_TOML_HEADER + to_toml(config))
        return self._launch(run_dir, job_id, name, config.train.max_steps)

    def job_config(self, toml_text: str, data: Path, name: str | None = None) -> JobConfig:
        """The job's validated JobConfig as the app runs it: the chosen data folder (and name),
        train.output_dir the runs folder until the job's own folder is made there, its base
        resolved and every path inside the app's folders (sd_lora.services.job_guard), and learning
        rates and steps left at 0 the base's recommendation (sd_lora.train.recommended)."""
        settings = [f"data.path={_toml_literal(str(data))}",
                    f"train.output_dir={_toml_literal(str(self.workspace.runs))}"]
        if name is not None:
            settings.append(f"train.name={_toml_literal(name)}")
        config = load_config_text(toml_text, settings, source="the job's TOML")
        return with_recommended(guard_job(config, self.workspace))  # job.toml: what runs

    def _new_run_dir(self, name: str) -> tuple[Path, str]:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(1, 1000):
            job_id = f"{stamp}-{name}" + (f"-{attempt}" if attempt > 1 else "")
            run_dir = self.workspace.resolve("runs", job_id)
            try:
                run_dir.mkdir()  # fails if taken: ids stay unique across app instances
                return run_dir, job_id
            except FileExistsError:
                continue
        raise JobError(f"no free run folder name for {name!r} in {self.workspace.runs}")

    def _launch(self, run_dir: Path, job_id: str, name: str, max_steps: int) -> str:
        command = [sys.executable, "-m", self.job_module, str(run_dir), str(self.workspace.adapters)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        with open(run_dir / "train.log", "wb") as log:  # the child keeps its own copy of the fd
            process = subprocess.Popen(command, cwd=run_dir, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self._processes[job_id] = process
        _write_json(run_dir / "job.json", {
            "job_id": job_id, "name": name, "pid": process.pid,
            "process_start": _process_start(process.pid), "started": time.time(),
            "max_steps": int(max_steps), "command": command,
        })
        return job_id

    # --- status --------------------------------------------------------------------------------

    def _run_dir(self, job_id: str) -> tuple[Path, dict]:
        run_dir = self.workspace.resolve("runs", job_id)
        job = _read_json(run_dir / "job.json")
        if job is None:
            raise JobError(f"no job {job_id!r} in {self.workspace.runs}")
        return run_dir, job

    def _alive(self, job_id: str, job: dict) -> bool:
        process = self._processes.get(job_id)
        if process is not None:
            return process.poll() is None
        pid, recorded = job.get("pid"), job.get("process_start")
        if not pid:
            return False
        current = _process_start(pid)
        if recorded is not None:
            return current == recorded
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True

    def status(self, job_id: str) -> JobStatus:
        run_dir, job = self._run_dir(job_id)
        losses = _losses(run_dir / "loss.csv")
        step = losses[-1][0] if losses else 0
        max_steps = int(job.get("max_steps", 0))
        finished = _read_json(run_dir / "exit.json")
        if finished is None and not self._alive(job_id, job):
            finished = _read_json(run_dir / "exit.json")  # it may have exited just now
            if finished is None:
                finished = {"code": None}
        samples = sorted((run_dir / "samples").glob("*.png"), key=lambda p: (p.stem == "final", p.name))
        state, message, adapter = _outcome(run_dir, job, finished, step, max_steps)
        eta = _eta(run_dir, step, max_steps) if state == "running" else None
        return JobStatus(job_id, job.get("name", job_id), state, step, max_steps, eta, losses,
                         samples, adapter, message)

    def list_jobs(self) -> list[JobStatus]:
        """Every job in the runs folder, newest first."""
        found = []
        for job_file in self.workspace.runs.glob("*/job.json"):
            job = _read_json(job_file)
            if job is not None:
                found.append((job.get("started", 0), job_file.parent.name))
        return [self.status(job_id) for _, job_id in sorted(found, reverse=True)]

    def cancel(self, job_id: str) -> None:
        """Ask the trainer to stop (SIGINT, like Ctrl-C): it saves a checkpoint, then exits."""
        run_dir, job = self._run_dir(job_id)
        if (run_dir / "exit.json").exists() or not self._alive(job_id, job):
            raise JobError(f"job {job_id} is not running; nothing to cancel")
        _write_json(run_dir / "job.json", {**job, "cancel_requested": time.time()})
        try:
            os.killpg(job["pid"], signal.SIGINT)  # its own session: the group is the job alone
        except ProcessLookupError:
            raise JobError(f"job {job_id} ended before it could be cancelled") from None


def _losses(path: Path) -> list[tuple[int, float]]:
    try:
        with path.open() as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        return []
    losses = []
    for row in rows:
        try:
            losses.append((int(row["step"]), float(row["loss"])))
        except (TypeError, ValueError, KeyError):
            break  # a line being written right now
    return losses


def _eta(run_dir: Path, step: int, max_steps: int) -> float | None:
    """Seconds left at the pace so far. The loop starts right after config.toml is written, so
    its mtime excludes model loading; the last loss.csv write marks the latest step."""
    try:
        began = (run_dir / "config.toml").stat().st_mtime
        latest = (run_dir / "loss.csv").stat().st_mtime
    except FileNotFoundError:
        return None
    if step <= 0 or latest <= began:
        return None
    return max(0.0, (latest - began) / step * (max_steps - step))


def _log_tail(run_dir: Path, lines: int = 3) -> str:
    """The trainer's `error:` line, else the log's last lines: why a job failed."""
    try:
        text = (run_dir / "train.log").read_text(errors="replace")
    except FileNotFoundError:
        return "(no train.log)"
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    if errors:
        return errors[-1]
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _outcome(run_dir: Path, job: dict, finished: dict | None, step: int, max_steps: int):
    """(state, message, adapter path) from the exit record (None while running)."""
    cancel_requested = "cancel_requested" in job
    if finished is None:
        message = "cancelling: saving a checkpoint" if cancel_requested else f"step {step}/{max_steps}"
        return "running", message, None
    code = finished.get("code")
    if code == 0:
        adapter = finished.get("adapter") or finished.get("run_adapter")
        note = finished.get("publish_problem")
        message = f"done: {adapter}" + (f" ({note})" if note else "")
        return "done", message, Path(adapter) if adapter else None
    if code == INTERRUPTED or (cancel_requested and code is not None):
        return "cancelled", (f"cancelled at step {step}; the last checkpoint is in {run_dir} "
                             "(resume with sd-lora train --config job.toml --resume)"), None
    if code is None:
        return "failed", ("the training process ended without reporting (killed?); "
                          f"see {run_dir / 'train.log'}: {_log_tail(run_dir)}"), None
    return "failed", f"exit code {code}: {_log_tail(run_dir)}", None


# --- the job process ---------------------------------------------------------------------------


def train_job(config_path: Path, style_scorer: StyleScorer | None) -> int:
    """Train as `sd-lora train --config FILE --no-progress` would, with its exit codes: 0 done,
    2 a user error (printed), 130 interrupted (the last checkpoint kept), 1 anything else."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    def run() -> int:
        stop_on_sigterm()
        train(load_config(config_path), show_progress=False, style_scorer=style_scorer)
        return 0

    try:
        return exit_status(run)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1


def _first_cell(grid_path: Path):
    """The first image of a sample grid (one row, square cells above a caption strip)."""
    # The caption strip's height, measured rather than copied from image_grid.
    probe = Image.new("RGB", (128, 128))
    strip = image_grid([probe], 1, labels=["x"]).height - image_grid([probe], 1).height
    with Image.open(grid_path) as grid:
        side = grid.height - strip
        return grid.crop((0, 0, side, side)).copy()


def _publish_copy(source: Path, target: Path) -> None:
    """Copy without ever replacing an existing file: link a finished temp copy into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.link(tmp, target)  # atomic, and fails if `target` exists
    finally:
        os.unlink(tmp)


def publish(run_dir: Path, adapters_dir: Path) -> dict:
    """Copy the run's adapter to adapters/<name>.safetensors and its preview next to it."""
    config = load_config(run_dir / "job.toml")
    name = config.train.name
    source = next((adapter_path(run_dir, name, fmt) for fmt in ("kohya", "diffusers")
                   if adapter_path(run_dir, name, fmt).is_file()), None)
    if source is None:
        return {"publish_problem": f"no adapter file in {run_dir}"}
    target = adapters_dir / f"{name}.safetensors"
    record = {"run_adapter": str(source)}
    try:
        _publish_copy(source, target)
    except FileExistsError:
        return {**record, "publish_problem": f"{target} already exists; not replaced"}
    record["adapter"] = str(target)
    grid = run_dir / "samples" / "final.png"
    if grid.is_file():
        preview = adapters_dir / f"{name}.preview.png"
        with atomic_path(preview) as tmp:
            _first_cell(grid).save(tmp, format="PNG")
        record["preview"] = str(preview)
    return record


def run_job(run_dir: Path, adapters_dir: Path, style_scorer: StyleScorer | None = None) -> int:
    """The job process: train, record the exit code, publish the adapter on success."""
    code = train_job(run_dir / "job.toml", style_scorer)
    # Training is over: a late cancel must not cut the copy or the exit record in half.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    record: dict = {"code": code, "finished": time.time()}
    if code == 0:
        try:
            record.update(publish(run_dir, adapters_dir))
        except OSError as e:
            record["publish_problem"] = f"copying the adapter failed: {e}"
    _write_json(run_dir / "exit.json", record)
    return code


if __name__ == "__main__":
    sys.exit(run_job(Path(sys.argv[1]), Path(sys.argv[2])))
