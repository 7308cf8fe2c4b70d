"""LyCORIS LoHa and LoKr modules (Tucker-decomposed conv kernels too) and DoRA in kohya files:
read, applied as their formulas say, written back bit for bit, turned into plain LoRA by an SVD
(not DoRA), and refused where a layout cannot hold them (diffusers/PEFT)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_lora.adapters.apply import adapters_applied
from sd_lora.adapters.files import AdapterFileError, component_modules, load_adapter, save_adapter
from sd_lora.adapters.inspect import format_inspection, inspect_adapter
from sd_lora.adapters.transforms import resize
from sd_lora.formats.adapter_state import AdapterState, LohaModule, LokrModule
from sd_lora.formats.kohya import kohya_module_name
from sd_lora.models.builtin.tiny import build_tiny_pipeline

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


def applied(pipe, state, strength: float) -> dict[tuple[str, str], torch.Tensor]:
    """Each adapted layer's weight while `state` is applied at `strength` (UNet and TE)."""
    layers = component_modules(pipe)
    with adapters_applied(pipe, [(state, strength, strength)]):
        return {(c, p): layers[c][p].weight.detach().clone()
                for c, mods in state.modules.items() for p in mods}


def tucker_rebuild(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker factor by hand: kernel position (k, l) is a.T @ t[:, :, k, l] @ b."""
    out = torch.empty(a.shape[1], b.shape[1], *t.shape[2:])
    for k in range(t.shape[2]):
        for j in range(t.shape[3]):
            out[:, :, k, j] = a.T @ t[:, :, k, j] @ b
    return out


def test_tucker_decomposed_loha_and_lokr_kernels(tmp_path):
    """use_tucker conv modules: hada_t1/hada_t2 (r, r, kh, kw) with (r, out) and (r, in)
    matrices; lokr_t2 likewise for the factored w2."""
    pipe = build_tiny_pipeline()
    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    layers = component_modules(pipe)
    other = "down_blocks.0.resnets.1.conv2"
    out_c, in_c, kh, kw = layers["unet"][CONV].weight.shape
    out_o, in_o, _, _ = layers["unet"][other].weight.shape
    conv, conv2 = kohya_module_name("lora_unet", CONV), kohya_module_name("lora_unet", other)
    r = 2
    t = {
        f"{conv}.hada_t1": rand(r, r, kh, kw), f"{conv}.hada_w1_a": rand(r, out_c),
        f"{conv}.hada_w1_b": rand(r, in_c), f"{conv}.hada_t2": rand(r, r, kh, kw),
        f"{conv}.hada_w2_a": rand(r, out_c), f"{conv}.hada_w2_b": rand(r, in_c),
        f"{conv}.alpha": torch.tensor(1.0),
        f"{conv2}.lokr_w1": rand(4, 4), f"{conv2}.lokr_t2": rand(r, r, kh, kw),
        f"{conv2}.lokr_w2_a": rand(r, out_o // 4), f"{conv2}.lokr_w2_b": rand(r, in_o // 4),
        f"{conv2}.alpha": torch.tensor(3.0),
    }
    path = tmp_path / "tucker.safetensors"
    save_file(t, path, metadata={"ss_base_model_version": "sd_v1"})
    state = load_adapter(path)
    loha_want = (tucker_rebuild(t[f"{conv}.hada_t1"], t[f"{conv}.hada_w1_a"], t[f"{conv}.hada_w1_b"])
                 * tucker_rebuild(t[f"{conv}.hada_t2"], t[f"{conv}.hada_w2_a"], t[f"{conv}.hada_w2_b"])
                 * (1.0 / r))
    w2 = tucker_rebuild(t[f"{conv2}.lokr_t2"], t[f"{conv2}.lokr_w2_a"], t[f"{conv2}.lokr_w2_b"])
    lokr_want = torch.kron(t[f"{conv2}.lokr_w1"][:, :, None, None], w2) * (3.0 / r)
    torch.testing.assert_close(state.modules["unet"][CONV].delta(), loha_want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state.modules["unet"][other].delta(), lokr_want, atol=1e-6, rtol=1e-5)
    before = {p: layers["unet"][p].weight.detach().clone() for p in (CONV, other)}
    after = applied(pipe, state, 0.5)
    torch.testing.assert_close(after[("unet", CONV)], before[CONV] + 0.5 * loha_want, atol=1e-6, rtol=0)
    torch.testing.assert_close(after[("unet", other)], before[other] + 0.5 * lokr_want, atol=1e-6, rtol=0)
    written = load_file(save_adapter(state, tmp_path / "again.safetensors", dtype=torch.float32))
    assert set(written) == set(t) and all(torch.equal(written[k], t[k]) for k in t)
    for bad in ("hada_t2", "hada_w1_a"):  # half a Tucker pair, or a missing matrix, is named
        broken = {k: v for k, v in t.items() if k != f"{conv}.{bad}"}
        save_file(broken, path, metadata={"ss_base_model_version": "sd_v1"})
        with pytest.raises(AdapterFileError, match=f"lacks.*{bad}"):
            load_adapter(path)


def dora_by_hand(weight, down, up, scale, magnitude, strength, per_column: bool):
    """DoRA, one column (or row) at a time: V = W + scale * up @ down, each column of V set to
    the length `magnitude` gives it, then W + strength * (that - W)."""
    updated = weight + scale * (up @ down)
    target = updated.clone()
    if per_column:
        for j in range(updated.shape[1]):
            target[:, j] = updated[:, j] / (updated[:, j].norm() + 1e-6) * magnitude[0, j]
    else:
        for i in range(updated.shape[0]):
            target[i] = updated[i] / (updated[i].norm() + 1e-6) * magnitude[i, 0]
    return weight + strength * (target - weight)


def test_dora_modules_apply_as_the_formula_says(tmp_path):
    """`dora_scale` beside a LoRA module: (1, in) magnitudes (LyCORIS' default: column norms)
    on the UNet's to_q, (out, 1) magnitudes (row norms) on the text encoder's fc1."""
    pipe = build_tiny_pipeline()
    g = torch.Generator().manual_seed(4)
    layers = component_modules(pipe)
    wq, wf = layers["unet"][Q].weight.detach().clone(), layers["text_encoder"][TE_FC1].weight.detach().clone()
    q, fc1 = kohya_module_name("lora_unet", Q), kohya_module_name("lora_te", TE_FC1)
    t = {
        f"{q}.lora_down.weight": torch.randn(2, wq.shape[1], generator=g) * 0.3,
        f"{q}.lora_up.weight": torch.randn(wq.shape[0], 2, generator=g) * 0.3,
        f"{q}.alpha": torch.tensor(1.0),
        f"{q}.dora_scale": wq.norm(dim=0, keepdim=True) * (1 + 0.5 * torch.rand(1, wq.shape[1], generator=g)),
        f"{fc1}.lora_down.weight": torch.randn(4, wf.shape[1], generator=g) * 0.3,
        f"{fc1}.lora_up.weight": torch.randn(wf.shape[0], 4, generator=g) * 0.3,
        f"{fc1}.alpha": torch.tensor(8.0),
        f"{fc1}.dora_scale": wf.norm(dim=1, keepdim=True) * 0.7,
    }
    path = tmp_path / "dora.safetensors"
    save_file(t, path, metadata={"ss_base_model_version": "sd_v1"})
    state = load_adapter(path)
    assert state.kinds() == {"dora"}
    assert "(dora modules)" in format_inspection(inspect_adapter(path))
    for strength in (1.0, 0.5):
        after = applied(pipe, state, strength)
        want_q = dora_by_hand(wq, t[f"{q}.lora_down.weight"], t[f"{q}.lora_up.weight"], 0.5,
                              t[f"{q}.dora_scale"], strength, per_column=True)
        want_f = dora_by_hand(wf, t[f"{fc1}.lora_down.weight"], t[f"{fc1}.lora_up.weight"], 2.0,
                              t[f"{fc1}.dora_scale"], strength, per_column=False)
        torch.testing.assert_close(after[("unet", Q)], want_q, atol=1e-5, rtol=0)
        torch.testing.assert_close(after[("text_encoder", TE_FC1)], want_f, atol=1e-5, rtol=0)
    at_one = applied(pipe, state, 1.0)[("unet", Q)]
    torch.testing.assert_close(at_one.norm(dim=0, keepdim=True), t[f"{q}.dora_scale"], atol=1e-4, rtol=0)
    written = load_file(save_adapter(state, tmp_path / "again.safetensors", dtype=torch.float32))
    assert set(written) == set(t) and all(torch.equal(written[k], t[k]) for k in t)
    # The UNet's magnitudes are per input column, which PEFT's DoRA cannot hold.
    with pytest.raises(AdapterFileError, match="to_q: DoRA with per-input-column magnitudes"):
        save_adapter(state, tmp_path / "d.safetensors", format="diffusers")
    rows_only = AdapterState("sd1", {"text_encoder": state.modules["text_encoder"]})
    saved = save_adapter(rows_only, tmp_path / "rows.safetensors", format="diffusers",
                         dtype=torch.float32)  # per output row: PEFT's own DoRA
    back = load_adapter(saved)
    torch.testing.assert_close(back.modules["text_encoder"][TE_FC1].dora_scale,
                               t[f"{fc1}.dora_scale"], atol=0, rtol=0)
    from sd_lora.adapters.transforms import TransformError, merge
    with pytest.raises(TransformError, match="DoRA.*--into"):
        resize(state, rank=2)
    with pytest.raises(TransformError, match="DoRA"):
        merge([(state, 1.0)])
