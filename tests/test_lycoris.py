"""LyCORIS LoHa and LoKr modules in kohya files: read, applied as their formulas say, written
back bit for bit, turned into plain LoRA by an SVD, and refused where a layout cannot hold
them (diffusers/PEFT) or where they are not supported yet (Tucker kernels, DoRA)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_lora.adapter_io import AdapterFileError, component_modules, load_adapter, save_adapter
from sd_lora.apply import adapters_applied
from sd_lora.formats.kohya import kohya_module_name
from sd_lora.inspect_adapter import format_inspection, inspect_adapter
from sd_lora.lora_state import LohaModule, LokrModule
from sd_lora.tiny import build_tiny_pipeline
from sd_lora.transforms import resize

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
TE_FC1 = "text_model.encoder.layers.0.mlp.fc1"


def lycoris_file(tmp_path, pipe):
    """A LyCORIS file as its trainer writes it: LoHa on a Linear and a 3x3 conv (flattened),
    LoKr with a factored w2 on another Linear, metadata naming the family."""
    g = torch.Generator().manual_seed(0)
    layers = component_modules(pipe)
    out_q, in_q = layers["unet"][Q].weight.shape
    out_c, in_c, kh, kw = layers["unet"][CONV].weight.shape
    out_f, in_f = layers["text_encoder"][TE_FC1].weight.shape
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    q, conv = kohya_module_name("lora_unet", Q), kohya_module_name("lora_unet", CONV)
    fc1 = kohya_module_name("lora_te", TE_FC1)
    tensors = {
        f"{q}.hada_w1_a": rand(out_q, 2), f"{q}.hada_w1_b": rand(2, in_q),
        f"{q}.hada_w2_a": rand(out_q, 2), f"{q}.hada_w2_b": rand(2, in_q),
        f"{q}.alpha": torch.tensor(1.0),
        f"{conv}.hada_w1_a": rand(out_c, 3), f"{conv}.hada_w1_b": rand(3, in_c * kh * kw),
        f"{conv}.hada_w2_a": rand(out_c, 3), f"{conv}.hada_w2_b": rand(3, in_c * kh * kw),
        f"{conv}.alpha": torch.tensor(6.0),
        f"{fc1}.lokr_w1": rand(4, 4), f"{fc1}.lokr_w2_a": rand(out_f // 4, 2),
        f"{fc1}.lokr_w2_b": rand(2, in_f // 4), f"{fc1}.alpha": torch.tensor(4.0),
    }
    path = tmp_path / "lyco.safetensors"
    save_file(tensors, path, metadata={"ss_base_model_version": "sd_v1",
                                       "ss_network_module": "lycoris.kohya"})
    return path, tensors, (q, conv, fc1)


def test_loha_and_lokr_deltas_follow_their_formulas(tmp_path):
    pipe = build_tiny_pipeline()
    path, t, (q, conv, fc1) = lycoris_file(tmp_path, pipe)
    state = load_adapter(path)
    assert state.kinds() == {"loha", "lokr"}
    assert "format: kohya (loha, lokr modules)   family: sd1" in format_inspection(inspect_adapter(path))
    loha = state.modules["unet"][Q]
    assert isinstance(loha, LohaModule) and loha.r == 2
    want = ((t[f"{q}.hada_w1_a"] @ t[f"{q}.hada_w1_b"]) * (t[f"{q}.hada_w2_a"] @ t[f"{q}.hada_w2_b"])
            * (1.0 / 2))
    torch.testing.assert_close(loha.delta(), want)
    lokr = state.modules["text_encoder"][TE_FC1]
    assert isinstance(lokr, LokrModule) and lokr.scale == 4.0 / 2  # alpha / the w2 factor's dim
    want = torch.kron(t[f"{fc1}.lokr_w1"], t[f"{fc1}.lokr_w2_a"] @ t[f"{fc1}.lokr_w2_b"]) * 2.0
    torch.testing.assert_close(lokr.delta(), want)

    # Applied at strength 0.5: each layer is W + 0.5 * delta (the conv delta reshaped to 3x3).
    layers = component_modules(pipe)
    before = {k: layers[c][p].weight.detach().clone() for k, (c, p) in
              {"q": ("unet", Q), "conv": ("unet", CONV), "fc1": ("text_encoder", TE_FC1)}.items()}
    conv_delta = ((t[f"{conv}.hada_w1_a"] @ t[f"{conv}.hada_w1_b"])
                  * (t[f"{conv}.hada_w2_a"] @ t[f"{conv}.hada_w2_b"]) * 2.0)
    with adapters_applied(pipe, [(state, 0.5, 0.5)]):
        after = {k: layers[c][p].weight.detach().clone() for k, (c, p) in
                 {"q": ("unet", Q), "conv": ("unet", CONV), "fc1": ("text_encoder", TE_FC1)}.items()}
    torch.testing.assert_close(after["q"], before["q"] + 0.5 * loha.delta(), atol=1e-6, rtol=0)
    torch.testing.assert_close(after["conv"], before["conv"] + 0.5 * conv_delta.reshape(before["conv"].shape),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(after["fc1"], before["fc1"] + 0.5 * lokr.delta(), atol=1e-6, rtol=0)
    assert torch.equal(layers["unet"][Q].weight, before["q"])  # restored after the block


def test_lycoris_files_write_back_bit_for_bit_and_resize_to_plain_lora(tmp_path):
    pipe = build_tiny_pipeline()
    path, tensors, _ = lycoris_file(tmp_path, pipe)
    state = load_adapter(path)
    again = save_adapter(state, tmp_path / "again.safetensors", dtype=torch.float32)
    written = load_file(again)
    assert set(written) == set(tensors)
    assert all(torch.equal(written[k], tensors[k].float()) for k in tensors)
    with pytest.raises(AdapterFileError, match="LoHa and LoKr modules, which the diffusers"):
        save_adapter(state, tmp_path / "d.safetensors", format="diffusers")

    plain, reports = resize(state, rank=16)  # LoHa of rank 2 has rank <= 4; LoKr <= 4 * 2
    assert plain.kinds() == {"lora"}
    for component, modules in state.modules.items():
        for path_, module in modules.items():
            got = plain.modules[component][path_].delta()
            torch.testing.assert_close(got.reshape(module.delta().shape), module.delta(),
                                       atol=1e-5, rtol=1e-4)
    assert all(r.relative_error < 1e-5 for r in reports)


@pytest.mark.parametrize("part, message", [
    ("hada_t1", "Tucker-decomposed conv kernels"),
    ("dora_scale", "DoRA"),
])
def test_unsupported_lycoris_parts_are_named(tmp_path, part, message):
    pipe = build_tiny_pipeline()
    path, tensors, (q, _, _) = lycoris_file(tmp_path, pipe)
    tensors[f"{q}.{part}"] = torch.ones(2)
    save_file(tensors, path, metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(path)
