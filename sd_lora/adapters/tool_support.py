"""Which tools apply an adapter file as it was trained, said by name where they do not.

Read from each tool's loading code (docs/formats.md#dora-as-sd-lora-trains-it has the formulas;
tests/test_dora_tools.py applies them to a trained file): only the cases where a tool is known
to do something other than what the file means are named here.
"""

from __future__ import annotations

ROW_DORA = (
    "DoRA with one magnitude per output row (as sd-lora and PEFT train it): applied as trained "
    "by sd-lora, by ComfyUI from the run's -comfyui file, and by diffusers from the diffusers "
    "layout (a kohya file loses the magnitudes there). Not by AUTOMATIC1111 1.9-1.10 or "
    "InvokeAI (per input column only), ComfyUI with this file (it divides by the base "
    "weight's row norms, not the updated weight's) or sd-scripts (ignores dora_scale): give "
    "their users a plain LoRA"
)
COLUMN_DORA = (
    "DoRA with one magnitude per input column (LyCORIS' layout): applied as written by sd-lora, "
    "ComfyUI, AUTOMATIC1111 and InvokeAI; sd-scripts ignores dora_scale, and the diffusers "
    "layout cannot hold it"
)
COMFYUI_DORA = (
    "DoRA written for ComfyUI (sd_lora_dora_norm = base): its per-row magnitudes are rescaled "
    "for ComfyUI's formula, which divides by the base weight's row norms, so ComfyUI and "
    "sd-lora apply it as trained, on the base it was trained on; every other tool should get "
    "the run's standard file (without -comfyui)"
)
PEFT_LAYOUT = (
    "diffusers/PEFT layout: for diffusers (load_lora_weights) and sd-lora. AUTOMATIC1111 "
    "ignores these keys; ComfyUI applies only some (the text encoder's and the UNet's proj/ff "
    "modules, not its attention) and at alpha = rank: give both the kohya file (sd-lora "
    "convert FILE OUT --to kohya)"
)


SD3_PEFT_LAYOUT = (
    "SD3 in the diffusers/PEFT layout: for diffusers (load_lora_weights) and sd-lora. ComfyUI "
    "reads it whole but at alpha = rank (it reads no alphas from the metadata): right when "
    "every alpha equals its rank, as sd-lora's defaults have it; else give ComfyUI the kohya "
    "file (sd-lora convert FILE OUT --to kohya). AUTOMATIC1111 does not run SD3"
)
SD3_KOHYA = (
    "SD3 in the kohya layout (original MMDiT names, fused qkv), as sd-scripts writes it: "
    "ComfyUI and sd-scripts read it; diffusers 0.42 reads none of it (give diffusers users "
    "the diffusers file); AUTOMATIC1111 does not run SD3"
)


def tool_notes(layout: str, dora_axes: set[str], family: str | None = None) -> list[str]:
    """Warnings for a file of `layout` ("kohya", "diffusers", ...) for `family` whose DoRA
    modules hold magnitudes on `dora_axes` (see `dora_axes`; empty for no DoRA)."""
    notes = []
    if family == "sd3":
        notes.append(SD3_PEFT_LAYOUT if layout == "diffusers" else SD3_KOHYA)
    elif layout == "diffusers":
        notes.append(PEFT_LAYOUT)
    if "row" in dora_axes and layout != "diffusers":
        notes.append(ROW_DORA)
    if "row-base" in dora_axes:
        notes.append(COMFYUI_DORA)
    if "column" in dora_axes:
        notes.append(COLUMN_DORA)
    return notes


def dora_axes(state) -> set[str]:
    """{"row", "column", "row-base"}: the axes of an AdapterState's DoRA magnitudes ("row-base":
    per row, written for ComfyUI's formula)."""
    axes = set()
    for modules in state.modules.values():
        for module in modules.values():
            if module.kind == "dora":
                shape = tuple(module.delta_shape())
                row = "row-base" if module.norm_of == "base" else "row"
                axes.add(row if module.on_output_axis(shape) else "column")
    return axes
