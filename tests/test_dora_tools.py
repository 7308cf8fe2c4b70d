"""How each tool applies sd-lora's kohya DoRA file, by that tool's own formula (written here from
its code's documented behaviour, not copied), against the weights that were trained.

The trained weight of a layer is W' = m * V / ||V||_row with V = W + (alpha/r) up @ down and m
the learned per-output-row magnitudes (PEFT's DoRA). The tools:

- sd-lora: that formula (`DoraModule.delta_on`);
- ComfyUI (`comfy/weight_adapter/base.py` weight_decompose, 2025-2026): a `dora_scale` whose
  first dimension is the layer's output size is taken per row, but divided by the row norms of
  W, not of V (plus float eps); any other shape per input column, divided by V's column norms;
- AUTOMATIC1111 1.9-1.10 (`extensions-builtin/Lora/network.py` apply_weight_decompose) and
  InvokeAI 6.x (`DoRALayer` with `dora_scale`): V's column norms always, `dora_scale`
  broadcast against them;
- sd-scripts (`networks/lora.py`) reads no `dora_scale`: W + (alpha/r) up @ down; diffusers
  drops it from a kohya file the same way (with a warning).

The errors measured here are the ones docs/formats.md quotes; the test fails if one of those
tools starts to match (then the table is wrong) or if sd-lora's own stops matching.
"""

from __future__ import annotations

import pytest
import torch

from sd_lora.adapters.files import component_modules, load_adapter, pipeline_module_paths
from sd_lora.models.builtin.tiny import build_tiny_pipeline
from tests.lora_helpers import train_keeping_loop
from tests.test_dora import dora_job


def updated(w, down, up, scale):
    return w + scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)


def row_norm(v):
    return v.reshape(v.shape[0], -1).norm(dim=1).reshape(v.shape[0], *[1] * (v.dim() - 1))


def column_norm(v):
    return v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1).reshape(
        v.shape[1], *[1] * (v.dim() - 1)).transpose(0, 1)


def comfyui(w, down, up, scale, dora_scale):
    v = updated(w, down, up, scale)
    on_rows = dora_scale.shape[0] == v.shape[0]
    norm = (row_norm(w) if on_rows else column_norm(v)) + torch.finfo(w.dtype).eps
    return v * (dora_scale / norm)


def a1111_or_invokeai(w, down, up, scale, dora_scale):
    v = updated(w, down, up, scale)
    return v * (dora_scale / column_norm(v))


def sd_scripts(w, down, up, scale, dora_scale):
    return updated(w, down, up, scale)


TOOLS = {"ComfyUI": comfyui, "A1111 / InvokeAI": a1111_or_invokeai,
         "sd-scripts / diffusers (kohya file)": sd_scripts}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny DoRA run (UNet attention and convolutions, text encoder): its files."""
    result, _ = train_keeping_loop(dora_job(tmp_path_factory.mktemp("dora"), "t",
                                            'lora.unet_targets=["attn", "conv"]'))
    return result.adapter_files


def layers_and_modules(path):
    """[(base weight, module read by sd-lora)] for every module of the file."""
    base = build_tiny_pipeline()
    state = load_adapter(path, pipeline_module_paths(base))
    layers = component_modules(base)
    return [(layers[c][p].weight.detach().float(), module)
            for c, modules in state.modules.items() for p, module in modules.items()]


@pytest.fixture(scope="module")
def trained(run):
    return layers_and_modules(run["kohya"])


def relative_error(tool, pairs, trained_pairs=None, strength: float = 1.0) -> float:
    """Over every DoRA layer: |tool's weight - trained weight| / |trained weight - W|, the tool
    reading `pairs`' tensors as its file holds them; the trained weights are those of
    `trained_pairs` as sd-lora applies the standard file (default: `pairs`). At `strength` s
    every tool here applies W + s * (its weight - W)."""
    off = change = 0.0
    for (w, module), (_, trained) in zip(pairs, trained_pairs or pairs):
        want = w + trained.delta_on(w, strength)
        got = tool(w, module.inner.lora_A, module.inner.lora_B, module.scale,
                   module.dora_scale.reshape(-1, *[1] * (w.dim() - 1)))
        got = w + strength * (got - w)
        off += float((got - want).pow(2).sum())
        change += float((want - w).pow(2).sum())
    return (off / change) ** 0.5


def test_sd_lora_applies_its_file_as_trained_and_the_tools_do_not(trained):
    # (1e-5 apart: sd-lora adds 1e-6 to the norms, as LyCORIS does; the paper's formula does not)
    assert relative_error(lambda w, d, u, s, m: w + _ours(w, d, u, s, m), trained) < 1e-4
    errors = {name: relative_error(tool, trained) for name, tool in TOOLS.items()}
    print("relative error of the DoRA change, by tool:", errors)
    for name, error in errors.items():
        assert error > 0.05, (name, error)  # not applied as trained: the docs say so


def _ours(w, down, up, scale, magnitude):
    v = updated(w, down, up, scale)
    return v * (magnitude / row_norm(v)) - w


def test_inspect_names_the_tools_that_misapply_a_dora_file(tmp_path):
    from sd_lora.adapters.inspect import format_inspection, inspect_adapter
    from sd_lora.adapters.tool_support import COLUMN_DORA, PEFT_LAYOUT, ROW_DORA, tool_notes

    result, _ = train_keeping_loop(dora_job(tmp_path, "n", 'export.formats=["kohya", "diffusers"]'))
    kohya = format_inspection(inspect_adapter(result.adapter_files["kohya"]))
    for tool in ("AUTOMATIC1111", "InvokeAI", "ComfyUI", "sd-scripts"):
        assert tool in kohya
    assert f"tools: {ROW_DORA}" in kohya
    diffusers = inspect_adapter(result.adapter_files["diffusers"])
    assert diffusers["tools"] == [PEFT_LAYOUT]  # its DoRA is what diffusers applies as trained
    assert tool_notes("kohya", {"column"}) == [COLUMN_DORA]
    assert tool_notes("kohya", set()) == []  # a plain LoRA file: nothing to warn about


def test_the_comfyui_file_is_applied_as_trained_by_comfyui_and_by_sd_lora(run, trained):
    """`<name>-comfyui.safetensors`: magnitudes rescaled for ComfyUI's formula."""
    comfy = layers_and_modules(run["comfyui"])
    assert [m.norm_of for _, m in comfy if m.kind == "dora" and m.on_output_axis(
        tuple(m.delta_shape()))] and all(m.norm_of == "base" for _, m in comfy if m.kind == "dora")
    for strength in (1.0, 0.5):
        assert relative_error(comfyui, comfy, trained, strength) < 1e-4, strength
    # sd-lora reads the file's marker and applies ComfyUI's formula to it: the trained weights
    ours = sum(float((m.delta_on(w) - t.delta_on(w)).pow(2).sum()) for (w, m), (_, t) in zip(comfy, trained))
    change = sum(float(t.delta_on(w).pow(2).sum()) for w, t in trained)
    assert (ours / change) ** 0.5 < 1e-4
    # and the other tools still do not apply it as trained
    assert relative_error(a1111_or_invokeai, comfy, trained) > 0.05


def test_the_comfyui_file_says_what_it_is_for_and_is_not_converted_to_peft(run, tmp_path):
    from sd_lora.adapters.files import AdapterFileError, load_adapter, save_adapter
    from sd_lora.adapters.inspect import format_inspection, inspect_adapter
    from sd_lora.adapters.tool_support import COMFYUI_DORA

    assert f"tools: {COMFYUI_DORA}" in format_inspection(inspect_adapter(run["comfyui"]))
    state = load_adapter(run["comfyui"])
    with pytest.raises(AdapterFileError, match="written for ComfyUI's formula"):
        save_adapter(state, tmp_path / "x.safetensors", format="diffusers")
    again = save_adapter(state, tmp_path / "again.safetensors", format="kohya")  # marker kept
    assert all(m.norm_of == "base" for _, m in layers_and_modules(again) if m.kind == "dora"
               and m.on_output_axis(tuple(m.delta_shape())))
