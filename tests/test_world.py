"""The toy world: styles, committed datasets, and the scorers that read pictures back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_lora.world.datasets import (
    HELDOUT_SEED,
    TOY_HELDOUT_COUNT,
    TOY_SIZE,
    TOY_TRAIN_COUNT,
    TRAIN_SEED,
    write_toy_datasets,
)
from sd_lora.world.scenes import caption, render, scene_at
from sd_lora.world.scorer import judge, read_picture, style_score
from sd_lora.world.styles import STYLES, TOY_STYLES

TOY_DATA = Path(__file__).resolve().parents[1] / "datasets" / "toy"


def test_every_style_has_a_distinct_trigger_the_base_never_saw():
    triggers = [STYLES[name].trigger for name in TOY_STYLES]
    assert len(set(triggers)) == len(triggers) and all(t.startswith("zk") for t in triggers)
    assert STYLES["plain"].trigger is None


def test_styles_draw_the_same_scene_differently():
    scene = scene_at(3, 0)
    plain = np.asarray(render(scene, STYLES["plain"], 64), int)
    for name in TOY_STYLES:
        styled = np.asarray(render(scene, STYLES[name], 64), int)
        assert np.abs(styled - plain).mean() > 2, name
        assert caption(scene, STYLES[name]).startswith(STYLES[name].trigger + ", ")


def test_scorer_reads_rendered_scenes_back():
    """On ground-truth renders the reader gets background, colour and shape right every time."""
    marks = [judge(read_picture(render(scene_at(i, 11, 1), STYLES["plain"], 64)), scene_at(i, 11, 1))
             for i in range(120)]
    for aspect in ("background", "colour", "shape"):
        assert all(m[aspect] for m in marks), aspect
    assert np.mean([m["count"] for m in marks]) > 0.97


def test_scorer_notices_a_wrong_picture():
    scene = scene_at(0, 11, 1)
    (kind, colour), _ = next(iter(scene.groups.items()))
    other_kind = next(k for k in ("circle", "square", "triangle") if k != kind)
    wrong = type(scene)(scene.background, tuple(
        type(s)(other_kind, s.colour, s.cell, s.radius, s.offset) for s in scene.shapes))
    mark = judge(read_picture(render(wrong, STYLES["plain"], 64)), scene)
    assert mark["colour"] and not mark["shape"]
    empty = Image.new("RGB", (64, 64), (40, 90, 200))
    assert not judge(read_picture(empty), scene)["colour"]


@pytest.mark.parametrize("style", TOY_STYLES)
def test_style_score_separates_each_style_from_plain_and_from_the_others(style):
    """Averaged over 32 unseen scenes: ~1 for the style, ~0 for plain, and well under 0.5 for
    every other style, so a score rise means this style and not just 'something changed'."""
    def mean_score(drawn_in: str) -> float:
        return float(np.mean([style_score(render(scene_at(i, 5), STYLES[drawn_in], 64), style)
                              for i in range(32)]))

    assert mean_score(style) > 0.8
    assert abs(mean_score("plain")) < 0.25  # single sepia scores vary by ~0.5
    for other in TOY_STYLES:
        if other != style:
            assert mean_score(other) < 0.5, other


def test_committed_toy_datasets_match_their_generator(tmp_path):
    written = write_toy_datasets(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in written} == {
        "plain", *TOY_STYLES, *(f"heldout/{s}" for s in ("plain", *TOY_STYLES))}
    for fresh in sorted(tmp_path.rglob("*.*")):
        committed = TOY_DATA / fresh.relative_to(tmp_path)
        assert committed.is_file(), committed
        if fresh.suffix == ".txt":
            assert fresh.read_text() == committed.read_text()
        else:
            diff = np.abs(np.asarray(Image.open(fresh), int) - np.asarray(Image.open(committed), int))
            assert diff.mean() < 0.5, committed
    assert len(list((TOY_DATA / "stripes").glob("*.png"))) == TOY_TRAIN_COUNT
    assert len(list((TOY_DATA / "heldout" / "plain").glob("*.png"))) == TOY_HELDOUT_COUNT
    assert Image.open(TOY_DATA / "pixel" / "0000.png").size == (TOY_SIZE, TOY_SIZE)
    # held-out scenes are other scenes than the training ones, and plain/styled held-out are pairs
    assert TRAIN_SEED != HELDOUT_SEED
    train_captions = {p.read_text() for p in (TOY_DATA / "plain").glob("*.txt")} | {
        p.read_text().split(", ", 1)[1] for p in (TOY_DATA / "stripes").glob("*.txt")}
    heldout = [p.read_text() for p in sorted((TOY_DATA / "heldout" / "plain").glob("*.txt"))]
    assert len(set(heldout) - train_captions) >= TOY_HELDOUT_COUNT - 2
    assert [p.read_text().split(", ", 1)[1] for p in
            sorted((TOY_DATA / "heldout" / "sepia").glob("*.txt"))] == heldout
