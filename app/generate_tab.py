"""The Generate tab: base, prompt, sampling settings, adapter slots, gallery, send-back.

`GenerateTab.build()` lays the components out; the handlers are plain methods that call
`sd_lora` (a GenerationSession for rendering, the workspace for names and files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from sd_lora.adapters.block_weights import BLOCK_NAMES, PRESETS
from sd_lora.generate.png_info import read_png_parameters
from sd_lora.models.schedulers import DEFAULT_SAMPLER, SAMPLERS
from sd_lora.services.session import GenerationSession
from sd_lora.services.workspace import Workspace, list_adapters, list_bases

from .common import (
    NO_ADAPTER,
    NUM_SLOTS,
    adapter_choices,
    describe_adapter,
    family_warning,
    find_adapter,
    friendly,
)
from .forms import build_request, form_signature, restore_form

HISTORY_SIZE = 12
STRENGTH = dict(minimum=-3.0, maximum=3.0, step=0.05, value=1.0)
BLOCKS_HELP = (
    "Per-block weights, as the LoRA Block Weight extension: a preset "
    f"({', '.join(PRESETS)}) or {len(BLOCK_NAMES)} numbers for {', '.join(BLOCK_NAMES)} "
    "(BASE is the text encoder). Empty: every block at 1."
)


@dataclass
class Slot:
    name: gr.Dropdown
    unet: gr.Slider
    te: gr.Slider
    blocks: gr.Textbox
    preset: gr.Dropdown
    info: gr.Markdown
    preview: gr.Image

    def values(self) -> list:
        return [self.name, self.unet, self.te, self.blocks]


@dataclass
class GenerateTab:
    workspace: Workspace
    session: GenerationSession
    slots: list[Slot] = field(default_factory=list)

    # --- layout --------------------------------------------------------------------------------

    def build(self) -> None:
        with gr.Row():
            with gr.Column(scale=3):
                self._build_settings()
                self._build_slots()
            with gr.Column(scale=2):
                self._build_results()
        self.results = gr.State([])  # names (relative to outputs) of the gallery's images
        self.history_names = gr.State([])
        self.last_seed = gr.State(-1)

    def _build_settings(self) -> None:
        bases = list_bases(self.workspace)
        with gr.Row(elem_classes=["row-end"]):
            self.base = gr.Dropdown(bases, value=bases[0], label="Base model", allow_custom_value=True,
                                    info="built-in toy or tiny, a model in the models folder, or a hub id (org/name)",
                                    elem_id="gen-base", scale=4)
            self.refresh = gr.Button("Rescan folders", elem_id="gen-refresh", scale=1, size="sm")
        self.prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
        self.negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen-negative")
        with gr.Row(elem_classes=["row-end"]):
            self.seed = gr.Number(-1, label="Seed (-1: random)", precision=0, elem_id="gen-seed", scale=2)
            self.seed_random = gr.Button("Random", elem_id="gen-seed-random", scale=1, size="sm")
            self.seed_reuse = gr.Button("Reuse last", elem_id="gen-seed-reuse", scale=1, size="sm")
            self.sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler",
                                       elem_id="gen-sampler", scale=2)
        with gr.Row():
            self.steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="gen-steps")
            self.guidance = gr.Slider(0, 30, value=7.0, step=0.5, label="Guidance (CFG)", elem_id="gen-guidance")
            self.batch = gr.Slider(1, 16, value=1, step=1, label="Batch count", elem_id="gen-batch")
        with gr.Row():
            self.width = gr.Slider(0, 2048, value=0, step=8, label="Width (0: the base's own)", elem_id="gen-width")
            self.height = gr.Slider(0, 2048, value=0, step=8, label="Height (0: the base's own)", elem_id="gen-height")

    def _build_results(self) -> None:
        self.run = gr.Button("Generate", variant="primary", elem_id="gen-run")
        self.warning = gr.Markdown(elem_id="gen-warning")
        self.gallery = gr.Gallery(label="Images", columns=2, height=360, elem_id="gen-gallery",
                                  object_fit="contain", interactive=False)
        self.status = gr.Markdown(elem_id="gen-status")
        self.parameters = gr.Textbox(label="Parameters (saved in the PNG)", lines=3,
                                     interactive=False, elem_id="gen-parameters")
        with gr.Row(elem_classes=["row-end"]):
            self.selected = gr.Textbox(label="Selected image (in the outputs folder)",
                                       interactive=False, elem_id="gen-selected", scale=3)
            self.send_back = gr.Button("Send parameters back", elem_id="gen-send-back", scale=1, size="sm")
        with gr.Accordion("History and PNG info", open=False):
            self.history = gr.Gallery(label="Recent images", columns=6, height=200,
                                      elem_id="gen-history", interactive=False)
            self.upload = gr.File(label="Read the parameters of a PNG", file_types=[".png"],
                                  elem_id="gen-png-upload", height=120)

    def _build_slots(self) -> None:
        choices = adapter_choices(self.workspace)
        with gr.Group():
            for i in range(NUM_SLOTS):
                with gr.Row():
                    preview = gr.Image(type="filepath", height=96, width=96, interactive=False,
                                       show_label=False, container=False, elem_id=f"lora-{i}-preview",
                                       scale=0, min_width=96, buttons=[])
                    with gr.Column(scale=3, min_width=200):
                        name = gr.Dropdown(choices, value=NO_ADAPTER, label=f"Adapter {i + 1}",
                                           allow_custom_value=True, elem_id=f"lora-{i}-name")
                        info = gr.Markdown(elem_id=f"lora-{i}-info", elem_classes=["slot-info"])
                    with gr.Column(scale=2, min_width=160):
                        unet = gr.Slider(label="UNet strength (SD3: transformer)", elem_id=f"lora-{i}-unet", **STRENGTH)
                        te = gr.Slider(label="Text-encoder strength", elem_id=f"lora-{i}-te", **STRENGTH)
                self.slots.append(Slot(name, unet, te, None, None, info, preview))
        with gr.Accordion("Advanced: per-block weights", open=False, elem_id="gen-blocks-panel"):
            gr.Markdown(BLOCKS_HELP)
            for i, slot in enumerate(self.slots):
                with gr.Row():
                    slot.preset = gr.Dropdown([""] + list(PRESETS), value="", label=f"Adapter {i + 1} preset",
                                              elem_id=f"lora-{i}-preset", scale=1)
                    slot.blocks = gr.Textbox(label=f"Adapter {i + 1} block weights", elem_id=f"lora-{i}-blocks",
                                             placeholder="empty: all 1 · a preset · 17 numbers", scale=3)

    def form(self) -> list:
        """The components whose values make a GenerateRequest (forms.SETTINGS, then slots)."""
        settings = [self.base, self.prompt, self.negative, self.seed, self.steps, self.guidance,
                    self.width, self.height, self.sampler, self.batch]
        return settings + [c for slot in self.slots for c in slot.values()]

    # --- events --------------------------------------------------------------------------------

    def wire(self) -> None:
        names = [slot.name for slot in self.slots]
        generated = self.run.click(
            self.generate, self.form(),
            [self.gallery, self.parameters, self.selected, self.results, self.last_seed,
             self.status, self.history, self.history_names],
            api_name="generate", concurrency_id="model", concurrency_limit=1)
        self.seed_random.click(lambda: -1, None, self.seed, api_visibility="private", queue=False)
        self.seed_reuse.click(lambda seed: seed, self.last_seed, self.seed, api_visibility="private",
                              queue=False)
        for i, slot in enumerate(self.slots):
            slot.name.change(self.adapter_info, slot.name, [slot.info, slot.preview],
                             api_name="adapter_info" if i == 0 else None,
                             api_visibility="public" if i == 0 else "private", concurrency_limit=None)
            slot.preset.change(lambda p: p or "", slot.preset, slot.blocks, api_visibility="private",
                               queue=False)
        for i, trigger in enumerate([self.base.change] + [n.change for n in names]):
            trigger(self.check_adapters, [self.base] + names, self.warning,
                    api_name="check_adapters" if i == 0 else None,
                    api_visibility="public" if i == 0 else "private",
                    concurrency_limit=None, show_progress="hidden")
        # A new base is loaded by generating: its family is known from then on.
        generated.then(self.check_adapters, [self.base] + names, self.warning,
                       api_name="check_adapters_after_generate", api_visibility="private",
                       concurrency_limit=None, show_progress="hidden")
        self.refresh.click(self.rescan, None, [self.base] + names + [self.history, self.history_names],
                           api_name="rescan", concurrency_limit=None)
        self.gallery.select(_pick, self.results, self.selected, api_visibility="private", queue=False)
        self.history.select(_pick, self.history_names, self.selected, api_visibility="private", queue=False)
        restore_outputs = self.form() + [self.status]
        self.send_back.click(self.restore_output, self.selected, restore_outputs, api_name="send_back",
                             concurrency_limit=None)
        self.upload.upload(self.restore_upload, self.upload, restore_outputs, api_name="png_info",
                           concurrency_limit=None)

    @form_signature()
    @friendly
    def generate(self, *values):
        request = build_request(*values)
        images = self.session.generate(request)
        names = [self._output_name(img.path) for img in images]
        gallery = [(str(img.path), f"seed {img.seed}") for img in images]
        history, history_names = self.list_history()
        note = f"{len(images)} image(s) in {self.workspace.outputs}, last seed {images[-1].seed}"
        return (gallery, images[0].parameters, names[0], names, images[-1].seed, note,
                history, history_names)

    @friendly
    def adapter_info(self, name: str | None):
        info = find_adapter(self.workspace, name or "")
        preview = str(info.preview) if info is not None and info.preview else None
        return describe_adapter(info), preview

    @friendly
    def check_adapters(self, base: str | None, *names) -> str:
        """Flags, before anything renders, adapters that are missing, damaged or made for
        another base family."""
        infos, problems = [], []
        for name in names:
            try:
                info = find_adapter(self.workspace, name or "")
            except (ValueError, OSError) as exc:
                problems.append(f"⚠ {exc}")
                continue
            if info is not None:
                infos.append(info)
        base = base or ""
        loaded = self.session.base_family if self.session.loaded_base == base else None
        problems.append(family_warning(base, loaded, infos))
        return "\n\n".join(p for p in problems if p)

    @friendly
    def rescan(self):
        bases = list_bases(self.workspace)
        choices = adapter_choices(self.workspace)
        history, history_names = self.list_history()
        return (gr.update(choices=bases), *[gr.update(choices=choices) for _ in self.slots],
                history, history_names)

    @friendly
    def restore_output(self, name: str | None):
        if not name:
            raise gr.Error("select an image in the gallery or the history first")
        return self._restore(self.workspace.resolve("outputs", name))

    @friendly
    def restore_upload(self, upload):
        if upload is None:
            return [gr.skip()] * (len(self.form()) + 1)
        return self._restore(Path(upload if isinstance(upload, str) else upload.name))

    def _restore(self, path: Path):
        parsed = read_png_parameters(path)
        known = {info.name for info in list_adapters(self.workspace)}
        restored = restore_form(parsed, known)
        note = f"restored the settings of {path.name}" + "".join(f"; {n}" for n in restored.notes)
        return (*restored.settings, *restored.slots, note)

    def list_history(self) -> tuple[list, list[str]]:
        files = sorted(self.workspace.outputs.rglob("*.png"), key=lambda p: p.stat().st_mtime,
                       reverse=True)[:HISTORY_SIZE]
        return [(str(p), p.name) for p in files], [self._output_name(p) for p in files]

    def _output_name(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.workspace.outputs).as_posix()


def _pick(names: list[str], evt: gr.SelectData) -> str:
    """The output name of the clicked gallery image."""
    index = evt.index if isinstance(evt.index, int) else evt.index[0]
    return names[index] if 0 <= index < len(names) else ""
