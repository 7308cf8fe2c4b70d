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
from sd_lora.world.styles import GOLD, GOLDEN_MIX, PASTEL_MIX, STYLES, TOY_STYLES

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


def test_both_colour_grades_are_read_when_one_follows_the_other():
    """A blend of the pastel and golden adapters can only show both if the scorers see each
    grade through the other: pastel then golden, and golden then pastel, score on both."""
    white, gold = np.full(3, 255.0), np.array(GOLD, float)

    def pale(pixels):
        return pixels + (white - pixels) * PASTEL_MIX

    def golden(pixels):
        return pixels + (gold - pixels) * GOLDEN_MIX

    def mean_scores(grade) -> dict[str, float]:
        images = [np.clip(grade(np.asarray(render(scene_at(i, 5), STYLES["plain"], 64), float)),
                          0, 255).round().astype(np.uint8) for i in range(24)]
        return {s: float(np.mean([style_score(im, s) for im in images])) for s in ("pastel", "golden")}

    golden_then_pale = mean_scores(lambda x: pale(golden(x)))  # measured: 1.01, 0.48
    pale_then_golden = mean_scores(lambda x: golden(pale(x)))  # measured: 0.49, 0.99
    assert golden_then_pale["pastel"] > 0.8 and golden_then_pale["golden"] > 0.35, golden_then_pale
    assert pale_then_golden["pastel"] > 0.4 and pale_then_golden["golden"] > 0.8, pale_then_golden


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


def test_blend_command_tells_an_adapters_style_by_its_trigger_word():
    """`python -m sd_lora.world.blend FILE` reads the style from the kohya tag metadata, and
    says which file it cannot place rather than guessing."""
    import json
    from types import SimpleNamespace

    from sd_lora.world.blend import style_of

    def adapter(tags: dict) -> SimpleNamespace:
        return SimpleNamespace(metadata={"ss_tag_frequency": json.dumps({"32_golden": tags})})

    assert style_of(adapter({"zkgolden": 32, "a red circle": 4}), "g.safetensors") == "golden"
    for tags in ({"a red circle": 4}, {"zkgolden": 3, "zkpastel": 3}):
        with pytest.raises(SystemExit, match="g.safetensors: cannot tell which toy style"):
            style_of(adapter(tags), "g.safetensors")
