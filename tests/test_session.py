"""The app's generation session: one base load, fast weight changes, the CLI's exact pixels,
and every adapter checked before anything renders."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from sd_lora.adapters.use import AdapterUse
from sd_lora.cli import main as cli
from sd_lora.errors import UserError
from sd_lora.generate.png_info import read_png_parameters
from sd_lora.models.builtin.tiny_sdxl import build_tiny_sd2_pipeline
from sd_lora.services import session as session_module
from sd_lora.services.session import (
    AdapterLoadError,
    FamilyMismatchError,
    GenerateRequest,
    GenerationSession,
    RequestError,
    adapter_setting,
)
from sd_lora.services.workspace import PathOutsideError, Workspace
from tests.test_workspace import make_adapter_file

PROMPT = "zkstripes, a red circle"
STEPS = 6


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("space")
    space = Workspace.create(root / "adapters")
    make_adapter_file(space.adapters / "style.safetensors", seed=1)
    make_adapter_file(space.adapters / "detail.safetensors", seed=2, r=2, alpha=1.0)
    make_adapter_file(space.adapters / "sd2style.safetensors", pipe=build_tiny_sd2_pipeline())
    blob = (space.adapters / "style.safetensors").read_bytes()
    (space.adapters / "truncated.safetensors").write_bytes(blob[: len(blob) - 100])
    return space


@pytest.fixture(scope="module")
def loads(space):
    """One session for the module, with its base loads counted."""
    counted = []
    original = session_module.load_pipeline

    def counting(*args, **kwargs):
        counted.append(args[0])
        return original(*args, **kwargs)

    session_module.load_pipeline = counting
    yield GenerationSession(space), counted
    session_module.load_pipeline = original


def request(*adapters: AdapterUse, **kwargs) -> GenerateRequest:
    return GenerateRequest(prompt=PROMPT, seed=3, steps=STEPS, adapters=adapters, **kwargs)


def pixels(image_or_path) -> np.ndarray:
    image = image_or_path if isinstance(image_or_path, Image.Image) else Image.open(image_or_path)
    return np.asarray(image.convert("RGB"))


def cli_pixels(tmp_path, space, lora: str, sampler: str = "euler_a") -> np.ndarray:
    out = tmp_path / f"cli-{lora.replace(':', '_')}.png"
    code = cli.main(["generate", "--base", "tiny", "--lora", str(space.adapters / lora),
                     "--prompt", PROMPT, "--seed", "3", "--steps", str(STEPS), "--sampler", sampler,
                     "--output", str(out)])
    assert code == 0
    return pixels(out)


def test_weights_change_without_reloading_and_pixels_equal_the_cli(loads, space, tmp_path):
    session, counted = loads
    first = session.generate(request(adapter_setting("style", 0.3, 0.3)))[0]
    blended = session.generate(request(adapter_setting("style", 0.3, 0.3),
                                       adapter_setting("detail", -0.5, 1.0, blocks="OUTALL")))[0]
    again = session.generate(request(adapter_setting("style", 0.8, 0.8)))[0]
    split = session.generate(request(adapter_setting("style", unet=0.9, te=0.5)))[0]
    assert counted == ["tiny"]  # four renders with other weights: the base loaded once
    assert session.loaded_base == "tiny" and session.base_family == "sd1"
    assert not np.array_equal(pixels(first.image), pixels(again.image))
    assert not np.array_equal(pixels(first.image), pixels(blended.image))
    # After other weights and a blend, the same settings give the CLI's pixels exactly.
    assert np.array_equal(pixels(again.path), cli_pixels(tmp_path, space, "style.safetensors:0.8"))
    assert np.array_equal(pixels(split.path), cli_pixels(tmp_path, space, "style.safetensors:0.5:0.9"))


def test_adapter_files_are_read_once_until_they_change(loads, space, monkeypatch):
    session, _ = loads
    reads = []
    original = session_module.read_safetensors
    monkeypatch.setattr(session_module, "read_safetensors", lambda p: reads.append(p) or original(p))
    path = space.adapters / "detail.safetensors"
    session.generate(request(adapter_setting("detail", 0.5, 0.5)))
    session.generate(request(adapter_setting("detail", 0.7, 0.7)))
    assert reads == []  # read by the first test already, and unchanged since
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    session.generate(request(adapter_setting("detail", 0.7, 0.7)))
    assert reads == [path]


def test_png_records_settings_tags_and_hashes(loads):
    session, _ = loads
    results = session.generate(request(adapter_setting("style", 0.8, 0.8),
                                       adapter_setting("detail", 0.5, -0.2, blocks="1" + ",0" * 16),
                                       negative_prompt="blurry", batch_count=2))
    assert [r.seed for r in results] == [3, 4] and results[0].path != results[1].path
    parsed = read_png_parameters(results[1].path)
    assert (parsed.prompt, parsed.negative_prompt, parsed.seed, parsed.steps) == (PROMPT, "blurry", 4, STEPS)
    assert (parsed.sampler, parsed.model, parsed.width, parsed.height) == ("Euler a", "tiny", 64, 64)
    assert parsed.loras == [("style", 0.8, 0.8), ("detail", -0.2, 0.5)]  # (name, te, unet)
    assert parsed.lora_blocks == {"detail": "1" + ",0" * 16}
    hashes = parsed.extra["Lora hashes"]
    assert hashes.startswith("style: ") and ", detail: " in hashes
    assert results[1].parameters == Image.open(results[1].path).info["parameters"]


def test_random_seed_is_recorded(loads):
    session, _ = loads
    result = session.generate(GenerateRequest(prompt="x", steps=2))[0]
    assert 0 <= result.seed < 2**32 and read_png_parameters(result.path).seed == result.seed


def test_family_mismatch_is_flagged_before_rendering(loads, space, monkeypatch):
    session, _ = loads
    renders = []
    monkeypatch.setattr(session_module, "render", lambda *a: renders.append(a))
    written = set(space.outputs.rglob("*.png"))
    with pytest.raises(FamilyMismatchError, match="'sd2style' was trained for sd2 but the base 'tiny' is sd1"):
        session.generate(request(adapter_setting("style"), adapter_setting("sd2style")))
    assert renders == [] and set(space.outputs.rglob("*.png")) == written


def test_bad_adapter_files_give_readable_errors_and_the_session_goes_on(loads, space, tmp_path):
    session, counted = loads
    with pytest.raises(AdapterLoadError, match="'truncated'.*truncated.safetensors.*not a readable") as info:
        session.generate(request(adapter_setting("truncated")))
    assert isinstance(info.value, UserError)
    with pytest.raises(AdapterLoadError, match="'missing': no file missing.safetensors"):
        session.generate(request(adapter_setting("missing")))
    with pytest.raises(PathOutsideError):
        session.generate(request(adapter_setting("../adapters/style")))
    good = session.generate(request(adapter_setting("style", 0.8, 0.8)))[0]
    assert np.array_equal(pixels(good.path), cli_pixels(tmp_path, space, "style.safetensors:0.8"))
    assert counted == ["tiny"]


def test_compare_and_xy_grid(loads):
    session, _ = loads
    req = request(adapter_setting("style", 0.8, 0.8), adapter_setting("detail", 0.5, 0.5))
    grid, labels = session.compare(req)
    assert labels == ["no adapters", "style only (0.8)", "detail only (0.5)",
                      "blend: style 0.8, detail 0.5"]
    assert grid.width == 4 * 128  # 64 px cells enlarged to 128 for legibility
    xy = session.xy_grid(req, "style", [0.0, 1.0], [3, 5])
    assert xy.width == 2 * 128 and xy.height > 2 * 128
    # The weight-0 cell of seed 3 is the render with only "detail" at 0.5.
    only_detail = session.generate(request(adapter_setting("detail", 0.5, 0.5)))[0].image
    cell = xy.crop((0, 0, 128, 128)).resize((64, 64), Image.NEAREST)
    assert np.array_equal(pixels(cell), pixels(only_detail))
    with pytest.raises(RequestError, match="at most 100 cells"):
        session.xy_grid(req, "style", [0.1] * 11, list(range(10)))
    with pytest.raises(RequestError, match="at least one adapter"):
        session.compare(request())


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"steps": 0}, "steps = 0"),
        ({"width": 70}, "width = 70 must be a multiple of 8"),
        ({"height": 4096}, "height = 4096"),
        ({"seed": -5}, "seed = -5"),
        ({"guidance": float("nan")}, "guidance = nan"),
        ({"sampler": "bogus"}, "sampler: unknown sampler 'bogus'"),
        ({"batch_count": 0}, "batch_count = 0"),
        ({"base": ""}, "base = ''"),
        ({"adapters": (adapter_setting("a"), adapter_setting("a"))}, "each adapter may appear once"),
    ],
)
def test_request_errors_name_the_field(kwargs, named):
    with pytest.raises(RequestError, match=named):
        GenerateRequest(**kwargs)


def test_adapter_setting_errors_name_the_adapter():
    with pytest.raises(RequestError, match="adapter 'a': blocks: .*3 values"):
        adapter_setting("a", blocks="1,1,1")
    with pytest.raises(RequestError, match="adapter 'a': unet strength = inf"):
        adapter_setting("a", unet=float("inf"))
