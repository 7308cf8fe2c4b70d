"""The Compare tab: the Generate tab's settings rendered without adapters, with each adapter
alone and with the blend; and an X/Y grid of one adapter's weight against seeds."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from sd_lora.errors import UserError

from .common import NO_ADAPTER, adapter_choices, adapter_name, friendly
from .forms import build_request, form_signature, parse_list
from .generate_tab import GenerateTab


@dataclass
class CompareTab:
    gen: GenerateTab

    def build(self) -> None:
        gr.Markdown("Uses the base, prompt, seed, settings and adapters chosen on the **Generate** "
                    "tab. A seed of -1 draws one random seed, shared by every image.")
        self.run = gr.Button("Compare: no adapters · each adapter alone · the blend",
                             variant="primary", elem_id="cmp-run")
        self.image = gr.Image(type="pil", format="png", label="Side by side", interactive=False,
                              elem_id="cmp-image")
        self.labels = gr.Textbox(label="Columns", interactive=False, elem_id="cmp-labels")
        gr.Markdown("### X/Y grid: one adapter's weight (columns) against seeds (rows)")
        with gr.Row():
            self.xy_adapter = gr.Dropdown(self.adapter_names(), label="Adapter", allow_custom_value=True,
                                          elem_id="xy-adapter")
            self.xy_weights = gr.Textbox("0, 0.25, 0.5, 0.75, 1", label="Weights (UNet and text encoder)",
                                         elem_id="xy-weights")
            self.xy_seeds = gr.Textbox("1, 2", label="Seeds", elem_id="xy-seeds")
        self.xy_run = gr.Button("Render the X/Y grid", variant="primary", elem_id="xy-run")
        self.xy_image = gr.Image(type="pil", format="png", label="X/Y grid", interactive=False,
                                 elem_id="xy-image")

    def adapter_names(self) -> list[str]:
        return [name for _, name in adapter_choices(self.gen.workspace) if name != NO_ADAPTER]

    def wire(self) -> None:
        form = self.gen.form()
        self.run.click(self.compare, form, [self.image, self.labels], api_name="compare",
                       concurrency_id="model", concurrency_limit=1)
        self.xy_run.click(self.xy_grid, [self.xy_adapter, self.xy_weights, self.xy_seeds] + form,
                          self.xy_image, api_name="xy_grid", concurrency_id="model",
                          concurrency_limit=1)

    @form_signature()
    @friendly
    def compare(self, *values):
        request = build_request(*values)
        grid, labels = self.gen.session.compare(request)
        return grid, " | ".join(labels)

    @form_signature("adapter", "weights", "seeds")
    @friendly
    def xy_grid(self, adapter: str | None, weights: str, seeds: str, *values):
        adapter = adapter_name(adapter)  # a pasted <lora:NAME:W>: its weight is swept anyway
        if not adapter:
            raise UserError("choose the adapter whose weight the grid sweeps")
        request = build_request(*values)
        return self.gen.session.xy_grid(request, adapter, parse_list(weights, "weights"),
                                        parse_list(seeds, "seeds", int))
