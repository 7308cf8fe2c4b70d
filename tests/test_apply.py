"""Merging adapters into a pipeline: exact sums, exact restores, checks before any weight moves."""

from __future__ import annotations

import pytest
import torch

from sd_lora.adapters.apply import AdapterApplyError, adapters_applied, apply_adapters, restore
from sd_lora.adapters.files import component_modules
from sd_lora.adapters.use import AdapterUse
from sd_lora.formats.adapter_state import AdapterState, LoraModule

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
CONV = "down_blocks.0.resnets.0.conv1"  # 3x3 conv
PROJ_IN = "down_blocks.0.attentions.0.proj_in"  # 1x1 conv in SD 1.x
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def make_state(
    pipe,
    paths: dict[str, list[str]],
    seed: int,
    alpha: float = 8.0,
    r: int = 4,
    family: str = "sd1",
) -> AdapterState:
    gen = torch.Generator().manual_seed(seed)
    layers = component_modules(pipe)
    modules: dict[str, dict[str, LoraModule]] = {}
    for component, names in paths.items():
        for path in names:
            weight = layers[component][path].weight  # (out, in) or (out, in, kh, kw)
            down = torch.randn(r, *weight.shape[1:], generator=gen)
            up = torch.randn(
                weight.shape[0], r, *([1, 1] if weight.dim() == 4 else []), generator=gen
            )
            modules.setdefault(component, {})[path] = LoraModule(down, up * 0.1, alpha)
    return AdapterState(family=family, modules=modules)


def weights(pipe) -> dict[tuple[str, str], torch.Tensor]:
    return {
        (c, p): m.weight.detach().clone()
        for c, layers in component_modules(pipe).items()
        for p, m in layers.items()
    }


@pytest.fixture
def two(tiny_pipe):
    a = make_state(tiny_pipe, {"unet": [TO_Q, TO_K, CONV], "text_encoder": [TE_Q]}, seed=1)
    b = make_state(tiny_pipe, {"unet": [TO_Q, PROJ_IN], "text_encoder": [TE_Q]}, seed=2, alpha=2.0)
    return a, b


def test_two_adapters_with_positive_and_negative_strengths(tiny_pipe, two):
    a, b = two
    before = weights(tiny_pipe)
    applied = apply_adapters(tiny_pipe, [(a, 0.7, 0.5), (b, -0.3, 1.0)])
    after = weights(tiny_pipe)
    for (component, path), w0 in before.items():
        expected = w0.clone()
        for state, s_unet, s_te in ((a, 0.7, 0.5), (b, -0.3, 1.0)):
            module = state.modules.get(component, {}).get(path)
            if module is not None:
                expected += module.delta(s_unet if component == "unet" else s_te)
        if torch.equal(expected, w0):
            assert torch.equal(after[(component, path)], w0), (component, path)
        else:
            torch.testing.assert_close(after[(component, path)], expected, rtol=0, atol=1e-6)
    assert applied.coverage == [{"unet": 3, "text_encoder": 1}, {"unet": 2, "text_encoder": 1}]
    assert "unet 3 modules" in applied.summary()


def test_restore_gives_the_exact_originals(tiny_pipe, two):
    before = weights(tiny_pipe)
    restore(tiny_pipe, apply_adapters(tiny_pipe, [(two[0], 0.7, 0.7), (two[1], -0.3, -0.3)]))
    after = weights(tiny_pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_restore_is_exact_in_half_precision(tiny_pipe, two):
    tiny_pipe.to(dtype=torch.float16)
    before = weights(tiny_pipe)
    with adapters_applied(tiny_pipe, [(two[0], 1.3, 0.4)]):
        assert tiny_pipe.unet.dtype == torch.float16
        assert not torch.equal(weights(tiny_pipe)[("unet", TO_Q)], before[("unet", TO_Q)])
    after = weights(tiny_pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_new_strengths_replace_the_old_ones(tiny_pipe, two):
    a, b = two
    first = apply_adapters(tiny_pipe, [(a, 1.0, 1.0), (b, 1.0, 1.0)])
    replaced = apply_adapters(tiny_pipe, [(a, 0.25, 0.0)], replace=first)
    got = weights(tiny_pipe)
    restore(tiny_pipe, replaced)
    base = weights(tiny_pipe)
    fresh = apply_adapters(tiny_pipe, [(a, 0.25, 0.0)])
    anew = weights(tiny_pipe)
    assert all(torch.equal(got[k], anew[k]) for k in got)  # the same as applying anew
    assert torch.equal(got[("unet", PROJ_IN)], base[("unet", PROJ_IN)])  # b's layers went back
    restore(tiny_pipe, fresh)


def test_double_merge_is_refused(tiny_pipe, two):
    apply_adapters(tiny_pipe, [two[0]])
    with pytest.raises(AdapterApplyError, match="already merged"):
        apply_adapters(tiny_pipe, [two[1]])


def test_family_mismatch_names_the_adapter_and_touches_nothing(tiny_pipe, two):
    sd2 = make_state(tiny_pipe, {"unet": [TO_Q]}, seed=3, family="sd2")
    before = weights(tiny_pipe)
    with pytest.raises(
        AdapterApplyError, match="style was trained for 'sd2' but the pipeline is 'sd1'"
    ):
        apply_adapters(tiny_pipe, [(two[0], 1.0, 1.0), AdapterUse(sd2, 1.0, 1.0, name="style")])
    assert all(torch.equal(before[k], v) for k, v in weights(tiny_pipe).items())


def test_shape_mismatch_names_module_and_shapes(tiny_pipe):
    bad = AdapterState(
        "sd1", {"unet": {TO_Q: LoraModule(torch.ones(4, 7), torch.ones(32, 4), 4.0)}}
    )
    with pytest.raises(
        AdapterApplyError, match=r"detail: unet\.down_blocks.*\(32, 7\).*\(32, 32\)"
    ):
        apply_adapters(tiny_pipe, [AdapterUse(bad, name="detail")])


def test_unknown_module_is_an_error(tiny_pipe):
    bad = AdapterState(
        "sd1", {"unet": {"down_blocks.9.x": LoraModule(torch.ones(1, 1), torch.ones(1, 1), 1.0)}}
    )
    with pytest.raises(AdapterApplyError, match="down_blocks.9.x.*does not exist"):
        apply_adapters(tiny_pipe, [bad])


@pytest.mark.gpu
def test_apply_and_restore_on_cuda_in_half_precision(tiny_pipe, two):
    tiny_pipe.to("cuda", dtype=torch.float16)
    before = weights(tiny_pipe)
    applied = apply_adapters(tiny_pipe, [(two[0], 0.7, 0.7), (two[1], -0.3, 0.0)])
    w = component_modules(tiny_pipe)["unet"][TO_Q].weight
    expected = (
        before[("unet", TO_Q)].float()
        + (
            two[0].modules["unet"][TO_Q].delta(0.7) + two[1].modules["unet"][TO_Q].delta(-0.3)
        ).cuda()
    )
    assert w.device.type == "cuda" and w.dtype == torch.float16
    torch.testing.assert_close(w.float(), expected, rtol=1e-3, atol=1e-3)
    restore(tiny_pipe, applied)
    assert all(torch.equal(before[k], v) for k, v in weights(tiny_pipe).items())
