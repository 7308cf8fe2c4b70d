"""Merge, resize and extract, checked on the deltas they are defined by: an exact merge is the
weighted sum of deltas; SVD results are the best low-rank approximation, with the error and
energy they report; resizing to full rank is lossless; extraction recovers a known low-rank
difference."""

from __future__ import annotations

import math

import pytest
import torch

from sd_lora.adapters.transforms import (
    TransformError,
    dynamic_rank,
    from_differences,
    merge,
    resize,
)
from sd_lora.formats.adapter_state import AdapterState, LoraModule
from tests.test_formats import random_state


def deltas(state: AdapterState) -> dict[tuple[str, str], torch.Tensor]:
    return {(c, p): m.delta(dtype=torch.float64) for c, mods in state.modules.items()
            for p, m in mods.items()}


def conv_state(seed: int, r: int = 2, alpha: float = 1.0) -> AdapterState:
    """A LoCon-style conv module (3x3 down, 1x1 up) and a Linear one."""
    g = torch.Generator().manual_seed(seed)
    return AdapterState(family="sd1", modules={"unet": {
        "down_blocks.0.resnets.0.conv1": LoraModule(torch.randn(r, 8, 3, 3, generator=g),
                                                    torch.randn(16, r, 1, 1, generator=g), alpha),
        "mid_block.attentions.0.proj_in": LoraModule(torch.randn(r, 12, generator=g),
                                                     torch.randn(12, r, generator=g), alpha),
    }})


@pytest.fixture
def two(tiny_pipe):
    a, b = random_state(tiny_pipe, seed=0), random_state(tiny_pipe, seed=1)
    only_a = next(iter(a.modules["unet"]))
    del b.modules["unet"][only_a]  # one module in the first adapter only
    return a, b, only_a


def test_exact_merge_is_the_weighted_sum_of_deltas(two):
    a, b, only_a = two
    merged, reports = merge([(a, 0.7), (b, -0.5)])
    da, db, dm = deltas(a), deltas(b), deltas(merged)
    assert set(dm) == set(da)
    for key, delta in dm.items():
        want = 0.7 * da[key] + (-0.5 * db[key] if key in db else 0)
        torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-5)
    ranks = {(r.component, r.path): r.rank_after for r in reports}
    assert ranks[("unet", only_a)] == 4 and set(ranks.values()) == {4, 8}
    assert max(r.relative_error for r in reports) < 1e-6


def test_compressed_merge_reports_its_error_and_is_exact_at_full_rank(two):
    a, b, _ = two
    full, full_reports = merge([(a, 1.0), (b, 1.0)], rank=8)
    assert max(r.relative_error for r in full_reports) < 1e-5
    low, reports = merge([(a, 1.0), (b, 1.0)], rank=2)
    exact = deltas(merge([(a, 1.0), (b, 1.0)])[0])
    for report in reports:
        key = (report.component, report.path)
        got = low.modules[report.component][report.path]
        assert got.r == 2 and got.alpha == 2.0
        actual = float((exact[key] - got.delta(dtype=torch.float64)).norm() / exact[key].norm())
        assert math.isclose(report.relative_error, actual, rel_tol=1e-4)
        # Eckart-Young: the squared error of the best rank-r approximation is the energy left.
        assert math.isclose(actual**2, 1 - report.energy_kept, rel_tol=1e-3, abs_tol=1e-9)


def test_resize_to_full_rank_is_lossless_and_lower_ranks_report_energy(tiny_pipe):
    state = random_state(tiny_pipe)
    same, reports = resize(state, rank=4)
    for key, delta in deltas(same).items():
        torch.testing.assert_close(delta, deltas(state)[key], rtol=1e-5, atol=1e-5)
    assert all(r.energy_kept > 1 - 1e-9 for r in reports)
    small, reports = resize(state, rank=1)
    assert small.ranks() == {1} and small.alphas() == {1.0}
    assert all(0 < r.energy_kept < 1 for r in reports)
    bigger, _ = resize(state, rank=16)  # a rank-4 delta has 4 singular values: rank stays <= 4
    assert bigger.ranks() == {4}


def test_dynamic_methods_pick_the_rank_from_the_singular_values():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0])
    assert dynamic_rank(s, "sv_ratio", 4, 16) == 3  # keeps s >= 8 / 4
    assert dynamic_rank(s, "sv_fro", 0.9, 16) == 2  # sqrt((64 + 16) / 85) = 0.97
    assert dynamic_rank(s, "sv_cumulative", 0.9, 16) == 3  # (8 + 4 + 2) / 15 = 0.93
    assert dynamic_rank(s, "sv_cumulative", 0.9, 2) == 2  # capped by the rank given
    with pytest.raises(TransformError, match="sv_ratio"):
        dynamic_rank(s, "sv_ratio", 0.5, 16)
    with pytest.raises(TransformError, match="unknown method"):
        dynamic_rank(s, "sv_magic", 0.5, 16)


def test_conv_modules_merge_and_resize_like_linear_ones():
    a, b = conv_state(0), conv_state(1, r=3, alpha=6.0)
    merged, _ = merge([(a, 1.0), (b, 0.5)])
    for key, delta in deltas(merged).items():
        torch.testing.assert_close(delta, deltas(a)[key] + 0.5 * deltas(b)[key], rtol=1e-5, atol=1e-5)
    conv = merged.modules["unet"]["down_blocks.0.resnets.0.conv1"]
    assert conv.lora_A.shape == (5, 8, 3, 3) and conv.lora_B.shape == (16, 5, 1, 1)
    same, _ = resize(merged, rank=5)
    for key, delta in deltas(same).items():
        torch.testing.assert_close(delta, deltas(merged)[key], rtol=1e-5, atol=1e-5)


def test_merging_different_bases_is_refused(tiny_pipe):
    a = random_state(tiny_pipe)
    with pytest.raises(TransformError, match="different base families"):
        merge([(a, 1.0), (random_state(tiny_pipe, family="sd2"), 1.0)])
    wrong = random_state(tiny_pipe)
    module = next(iter(wrong.modules["unet"].values()))
    module.lora_A = torch.randn(module.r, module.lora_A.shape[1] + 1)
    with pytest.raises(TransformError, match="disagree on its shape"):
        merge([(a, 1.0), (wrong, 1.0)])


def test_extraction_recovers_a_known_low_rank_difference():
    g = torch.Generator().manual_seed(3)
    known = {"unet": {f"m{i}": torch.randn(20, 3, generator=g) @ torch.randn(3, 30, generator=g)
                      for i in range(3)},
             "text_encoder": {"text_model.q": torch.randn(16, 16, generator=g) * 1e-9}}
    state, reports = from_differences("sd1", known, rank=3, min_relative=1e-6)
    assert set(state.modules) == {"unet"}  # the negligible difference is left out
    for path, delta in known["unet"].items():
        got = state.modules["unet"][path].delta(dtype=torch.float64)
        torch.testing.assert_close(got, delta.double(), rtol=1e-4, atol=1e-4)
    assert all(r.rank_before == 3 and r.relative_error < 1e-5 for r in reports)
    with pytest.raises(TransformError, match="same weights"):
        from_differences("sd1", {"unet": {"m": torch.zeros(4, 4)}}, rank=2)
