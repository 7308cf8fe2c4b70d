"""The page: three tabs over one workspace, one generation session and one job manager.

    demo = build_ui(workspace, GenerationSession(workspace), JobManager(workspace))

The tabs only lay out components and call `sd_lora`; see generate_tab, compare_tab, train_tab.
"""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from sd_lora.services.jobs import JobManager
from sd_lora.services.session import GenerationSession
from sd_lora.services.workspace import Workspace

from .compare_tab import CompareTab
from .generate_tab import GenerateTab
from .train_tab import TrainTab

TITLE = "sd-lora"
CSS = """
.mono textarea { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
.sdl-progress { display: flex; gap: 12px; align-items: center; }
.sdl-progress progress { flex: 1; height: 16px; accent-color: var(--color-accent); }
.row-end { align-items: flex-end !important; }
.row-end > button { max-height: 42px; margin-bottom: 8px; }
"""


def folders_line(workspace: Workspace) -> str:
    """The folders the app reads and writes, named once under their common parent."""
    folders = {"adapters": workspace.adapters, "outputs": workspace.outputs, "runs": workspace.runs}
    if workspace.models is not None:
        folders["models"] = workspace.models
    parent = Path(os.path.commonpath([str(f) for f in folders.values()]))
    shown = []
    for area, path in folders.items():
        relative = path.relative_to(parent).as_posix() if path != parent else "."
        shown.append(f"`{relative}/`" if relative == area else f"{area} `{relative}/`")
    return f"Folders in `{parent}`: " + " · ".join(shown)


def build_ui(workspace: Workspace, session: GenerationSession, jobs: JobManager) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"### sd-lora: LoRA adapters for Stable Diffusion\n{folders_line(workspace)}",
                    elem_id="header")
        gen = GenerateTab(workspace, session)
        compare = CompareTab(gen)
        train = TrainTab(workspace, jobs)
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                gen.build()
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                compare.build()
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train.build()
        gen.wire()
        compare.wire()
        train.wire([slot.name for slot in gen.slots] + [compare.xy_adapter])

        def page_load():
            """A (re)opened page lists the folders as they are now and shows the current job."""
            return (*gen.rescan(), gr.update(choices=compare.adapter_names()), *train.on_load())

        load_outputs = ([gen.base] + [s.name for s in gen.slots] + [gen.history, gen.history_names,
                        compare.xy_adapter] + train.load_outputs())
        demo.load(page_load, None, load_outputs, api_visibility="private", concurrency_limit=None)
    return demo
