"""The Train tab: pick or upload a dataset, see it, choose a preset or edit the TOML, start a
background job and follow it (progress, ETA, loss, samples); cancel keeps the last checkpoint.

Jobs live in the runs folder and run in their own processes (`sd_lora.services.jobs`), so closing the
page, or restarting the app, loses nothing: the job list is read back from the files.
"""

from __future__ import annotations

import html
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from sd_lora.data.scan import scan_dataset
from sd_lora.errors import UserError
from sd_lora.services.jobs import PRESETS, JobManager, JobStatus, preset_toml
from sd_lora.services.workspace import Workspace, extract_zip, list_bases
from sd_lora.train.preflight import JobCheck
from sd_lora.world.datasets import toy_regularization_folder

from .common import adapter_choices, format_seconds, friendly

DATASET_AREAS = ("datasets", "uploads")  # folders under runs/ whose subfolders are datasets
PREVIEW_IMAGES = 48
POLL_SECONDS = 1.5
QUICK_FIELDS = (  # (label, dotted config field, elem_id, precision): preset values as fields
    ("LoRA rank (UNet)", "lora.unet_r", "train-rank", 0),
    ("Steps (0: the base's recommendation)", "train.max_steps", "train-steps", 0),
    ("Learning rate (0: the base's recommendation)", "train.learning_rate", "train-lr", None),
    ("Resolution (0: the base's own)", "data.resolution", "train-resolution", 0),
)
EMPTY_LOSS = pd.DataFrame({"step": [], "loss": []})


@dataclass
class TrainTab:
    workspace: Workspace
    jobs: JobManager

    # --- layout --------------------------------------------------------------------------------

    def build(self) -> None:
        with gr.Row():
            with gr.Column(scale=1):
                self._build_dataset()
            with gr.Column(scale=1):
                self._build_job_settings()
        with gr.Row(elem_classes=["row-end"]):
            self.job = gr.Dropdown([], value=None, label="Job", elem_id="train-job", scale=4,
                                   allow_custom_value=True)
            self.refresh = gr.Button("Refresh jobs", elem_id="train-refresh", scale=1, size="sm")
        self.progress = gr.HTML(elem_id="train-progress")
        self.status = gr.Markdown(elem_id="train-status")
        with gr.Row():
            self.loss = gr.LinePlot(EMPTY_LOSS, x="step", y="loss", title="Training loss",
                                    elem_id="train-loss", height=260)
            self.samples = gr.Gallery(label="Sample grids", columns=2, height=260,
                                      interactive=False, elem_id="train-samples")
        self.timer = gr.Timer(POLL_SECONDS)
        self.seen = gr.State(None)  # what the page shows: skip unchanged polls

    def _build_dataset(self) -> None:
        with gr.Row(elem_classes=["row-end"]):
            self.data = gr.Dropdown(self.dataset_names(), value=None, allow_custom_value=True, scale=3,
                                    label="Image folder", elem_id="train-data",
                                    info="a folder from --datasets, or datasets/<name> or uploads/<name> in "
                                         f"{self.workspace.runs}")
            self.scan = gr.Button("Show the dataset", elem_id="train-scan", scale=1, size="sm")
        self.zip = gr.File(label="...or upload a zip of images and captions", file_types=[".zip"],
                           elem_id="train-zip", height=110)
        self.dataset = gr.Gallery(label="Images and captions", columns=6, height=220,
                                  interactive=False, elem_id="train-dataset")
        self.report = gr.Textbox(label="Dataset report (skipped files and warnings)", lines=4,
                                 interactive=False, elem_id="train-report")

    def _build_job_settings(self) -> None:
        bases = list_bases(self.workspace)
        with gr.Row():
            self.preset = gr.Dropdown(list(PRESETS), value="quick", label="Preset", elem_id="train-preset")
            self.base = gr.Dropdown(bases, value=bases[0], allow_custom_value=True, label="Base model",
                                    elem_id="train-base")
            self.name = gr.Textbox("my-lora", label="Adapter name", elem_id="train-name")
        with gr.Row():
            self.fields = [gr.Number(label=label, elem_id=elem, precision=precision, min_width=100)
                           for label, _, elem, precision in QUICK_FIELDS]
        with gr.Accordion("Job TOML (the fields above rewrite it from the preset; edit it last)",
                          open=False, elem_id="train-toml-panel"):
            self.toml = gr.Textbox(show_label=False, lines=14, max_lines=40, elem_id="train-toml",
                                   elem_classes=["mono"])
        with gr.Row():
            self.start = gr.Button("Start training", variant="primary", elem_id="train-start")
            self.cancel = gr.Button("Cancel (keeps the last checkpoint)", variant="stop",
                                    elem_id="train-cancel")

    # --- events --------------------------------------------------------------------------------

    def wire(self, adapter_dropdowns: list) -> None:
        self.adapter_dropdowns = adapter_dropdowns
        self.scan.click(self.show_dataset, [self.data, self.toml], [self.report, self.dataset],
                        api_name="dataset", concurrency_limit=2)
        self.zip.upload(self.upload_zip, self.zip, [self.data, self.report, self.dataset],
                        api_name="upload_zip", concurrency_limit=2)
        self.preset.change(self.preset_fields, self.preset, self.fields, api_visibility="private",
                           queue=False)
        for trigger in [self.preset, self.base, self.name, self.data, *self.fields]:
            trigger.change(self.job_toml, [self.preset, self.base, self.data, self.name, *self.fields],
                           self.toml, api_visibility="private", concurrency_limit=None,
                           show_progress="hidden")
        self.data.change(_default_name, [self.data, self.name], self.name, api_visibility="private",
                         queue=False)
        self.start.click(self.start_job, [self.data, self.toml, self.name], [self.job, self.status],
                         api_name="train_start", concurrency_limit=1)
        self.cancel.click(self.cancel_job, self.job, self.status, api_name="train_cancel",
                          concurrency_limit=None)
        self.refresh.click(self.job_list, None, self.job, api_name="jobs", concurrency_limit=None)
        poll_outputs = [self.progress, self.status, self.loss, self.samples, self.seen, *adapter_dropdowns]
        self.timer.tick(self.poll, [self.job, self.seen], poll_outputs, api_visibility="private",
                        concurrency_limit=None, show_progress="hidden")
        self.job.change(self.poll, [self.job, gr.State(None)], poll_outputs, api_name="train_status",
                        concurrency_limit=None, show_progress="hidden")

    def on_load(self):
        """Page (re)opened: fresh folder lists, the running job (or the newest) selected."""
        return (gr.update(choices=self.dataset_names()), self.job_list(),
                *self.preset_fields("quick"))

    def load_outputs(self) -> list:
        return [self.data, self.job, *self.fields]

    # --- datasets -------------------------------------------------------------------------------

    def dataset_names(self) -> list:
        """Dataset choices: the --datasets folder and its subfolders (shown by name, chosen by
        absolute path), then datasets/ and uploads/ under runs/."""
        names: list = []
        library = self.workspace.datasets
        if library is not None:
            names.append((f"{library.name} (the datasets folder)", str(library)))
            names += [(p.name, str(p)) for p in sorted(library.iterdir())
                      if p.is_dir() and not p.name.startswith(".")]
        for area in DATASET_AREAS:
            folder = self.workspace.runs / area
            if folder.is_dir():
                names += sorted((f"{area}/{p.name}",) * 2 for p in folder.iterdir()
                                if p.is_dir() and not p.name.startswith("."))
        return names

    def data_path(self, choice: str | None) -> Path:
        """A dataset choice (a name under runs/, or an absolute folder in the workspace)."""
        if not choice:
            raise UserError("choose an image folder (or upload a zip) first")
        path = Path(choice)
        if path.is_absolute():
            if not (self.workspace.contains(path) and path.is_dir()):
                raise UserError(f"{choice} is not a folder inside the app's folders")
            return path.resolve()
        path = self.workspace.resolve("runs", choice)
        if not path.is_dir():
            raise UserError(f"no folder {choice!r} in {self.workspace.runs}")
        return path

    @friendly
    def show_dataset(self, choice: str | None, toml_text: str | None = None):
        """The dataset's report (what `sd-lora check` says) and, from the job TOML when it
        parses and the app would start it, the plan: images and items per epoch, size, steps
        and epochs (and the base's memory, read only from a base the job may use)."""
        data = self.data_path(choice)
        scan = scan_dataset(data)
        shown = [(str(s.image), s.caption or "(no caption)") for s in scan.samples[:PREVIEW_IMAGES]]
        more = scan.num_images - len(shown)
        report = scan.report() + (f"\n(showing {len(shown)} of {scan.num_images} images)" if more else "")
        if toml_text:
            try:
                config = self.jobs.job_config(toml_text, data)
                # the regularization images count in the plan (the toy base's plain scenes)
                reg = (scan_dataset(Path(config.data.regularization))
                       if config.data.regularization else None)
                report += "\n\n" + JobCheck(config, "as chosen above", scan, reg).plan_text()
            except UserError:  # being edited, or refused: Start training says what is wrong
                pass
        return report, shown

    @friendly
    def upload_zip(self, upload):
        if upload is None:
            return gr.skip(), gr.skip(), gr.skip()
        zip_path = Path(upload if isinstance(upload, str) else upload.name)
        name = self._free_upload_name(zip_path.stem)
        extract_zip(self.workspace, zip_path, name)
        choice = f"uploads/{name}"
        report, shown = self.show_dataset(choice)
        return gr.update(choices=self.dataset_names(), value=choice), report, shown

    def _free_upload_name(self, stem: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".") or "upload"
        name, n = base, 1
        while (self.workspace.runs / "uploads" / name).exists():
            n += 1
            name = f"{base}-{n}"
        return name

    # --- the job's TOML -------------------------------------------------------------------------

    @friendly
    def preset_fields(self, preset: str):
        text = preset_toml(preset, "toy", "", "preset")
        config = tomllib.loads(text)
        return [_dotted(config, dotted) for _, dotted, _, _ in QUICK_FIELDS]

    @friendly
    def job_toml(self, preset, base, data, name, *fields):
        overrides = [f"{dotted}={value!r}" for (_, dotted, _, _), value in zip(QUICK_FIELDS, fields)
                     if value is not None]
        data_dir = self.data_path(data) if data else ""
        base = base or "toy"
        # On the toy base a job trains with the toy world's plain scenes, as the demo does:
        # without them a style leaks into prompts without its trigger word.
        regularization = (toy_regularization_folder(self.workspace.runs / "datasets")
                          if base == "toy" else "")
        return preset_toml(preset, base, data_dir, name or "my-lora", overrides, regularization)

    # --- jobs -----------------------------------------------------------------------------------

    @friendly
    def start_job(self, data, toml_text: str, name: str):
        job_id = self.jobs.start(self.data_path(data), toml_text or "", (name or "").strip())
        return self.job_list(select=job_id), f"started job **{job_id}**"

    @friendly
    def cancel_job(self, job_id: str | None):
        if not job_id:
            raise UserError("no job selected")
        self.jobs.cancel(job_id)
        return f"cancelling **{job_id}**: the trainer saves a checkpoint, then stops"

    def job_list(self, select: str | None = None):
        jobs = self.jobs.list_jobs()
        choices = [j.job_id for j in jobs]  # the state shows below; a label would go stale
        if select is None:
            running = [j.job_id for j in jobs if j.state == "running"]
            select = running[0] if running else (jobs[0].job_id if jobs else None)
        return gr.update(choices=choices, value=select)

    @friendly
    def poll(self, job_id: str | None, seen):
        skip = [gr.skip()] * (5 + len(self.adapter_dropdowns))
        if not job_id:
            return skip
        status = self.jobs.status(job_id)
        signature = [job_id, status.state, status.step, len(status.samples), status.message]
        if signature == seen:
            return skip
        finished = seen is not None and seen[0] == job_id and seen[1] == "running" and status.state == "done"
        adapters = [gr.skip()] * len(self.adapter_dropdowns)
        if finished or (status.state == "done" and seen is None):
            choices = adapter_choices(self.workspace)
            adapters = [gr.update(choices=choices) for _ in self.adapter_dropdowns]
        losses = pd.DataFrame(status.losses, columns=["step", "loss"]) if status.losses else EMPTY_LOSS
        samples = [(str(p), p.stem) for p in status.samples]
        return (progress_html(status), status_markdown(status), losses, samples, signature, *adapters)


def _dotted(config: dict, dotted: str):
    section, key = dotted.split(".")
    return config.get(section, {}).get(key)


def _default_name(data: str | None, name: str | None) -> str:
    """A new dataset suggests its folder's name for the adapter, unless one was typed."""
    if data and (not name or name == "my-lora"):
        return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(data).name).lstrip("._-") or "my-lora"
    return name or "my-lora"


def progress_html(status: JobStatus) -> str:
    total = max(status.max_steps, 1)
    percent = min(100.0, 100.0 * status.step / total)
    eta = f" · ETA {format_seconds(status.eta_seconds)}" if status.state == "running" else ""
    return (
        f'<div class="sdl-progress" data-state="{html.escape(status.state)}">'
        f'<progress value="{status.step}" max="{total}"></progress>'
        f"<span>{html.escape(status.state)} · step {status.step}/{status.max_steps} · "
        f"{percent:.0f}%{eta}</span></div>"
    )


def status_markdown(status: JobStatus) -> str:
    text = f"**{status.state}** · job {status.job_id}: {status.message}"
    if status.state == "done" and status.adapter is not None:
        text += f"  \nThe adapter **{status.name}** is now in the Generate tab's adapter lists."
    return text
