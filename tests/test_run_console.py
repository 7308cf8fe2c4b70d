"""What a training run tells the console while it runs: a line when each long phase starts and
one when it ends (with or without progress bars), bars with counts where a phase has several
items, a quality report that says why it renders nothing on the random `tiny` base, and loss
figures that name the images they are on."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from sd_lora.cli.main import main

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"
QUICK = ["--data", str(SAMPLE_DATA), "--base", "tiny", "--max-steps", "1",
         "--set", "sample.steps=2", "--set", "train.batch_size=2",
         "--set", "train.eval_images=4"]  # a 1-step run would skip it (sized to the run)
PHASES = ["model: loading the base 'tiny' ...",
          "latent cache: 16 image variants to encode or read (memory, data.cache_latents = 'auto') ...",
          "evaluation: loss before training on 4 training images (5 timesteps each, fixed noise) ...",
          "training: 1 step ...",
          "evaluation: loss after training on 4 training images",
          "samples: rendering 3 images (samples/final.png) ...",
          "export: writing ",
          "report: loss at adapter weight 0 and 1 on 4 training images (no held-out set) ...",
          "report: writing report.json, report.png ..."]


def run_train(output: Path, *flags: str) -> tuple[str, str]:
    """`sd-lora train` on the tiny base; (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *QUICK, "--output", str(output), *flags])
    assert code == 0, err.getvalue()
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("quiet") / "run"
    return output, *run_train(output, "--no-progress")


def test_a_phase_says_when_it_starts_and_ends_but_not_done_after_an_error(capsys):
    from sd_lora.util.phases import phase

    with phase("report", "rendering 2 images", 2, bar=False) as advance:
        advance(1)
        advance(1)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "report: rendering 2 images ..."
    assert re.fullmatch(r"report: done in \d+\.\d s", out[1]), out
    with pytest.raises(RuntimeError), phase("export", "writing a.safetensors"):
        raise RuntimeError("disk full")
    assert capsys.readouterr().out == "export: writing a.safetensors ...\n"


@pytest.mark.slow
def test_without_bars_every_phase_prints_a_line_when_it_starts_and_ends(quiet_run):
    _, out, err = quiet_run
    lines = out.splitlines()
    starts = [next((i for i, line in enumerate(lines) if line.startswith(p)), None) for p in PHASES]
    assert None not in starts, [p for p, i in zip(PHASES, starts) if i is None]
    assert starts == sorted(starts)  # in the order they run
    done = [line.split(":")[0] for line in lines if re.fullmatch(r"[a-z ]+: done in \d+\.\d s", line)]
    assert done == [p.split(":")[0] for p in PHASES]
    assert "%|" not in err  # no bar, and none of diffusers' loading bars either
    assert re.search(r"training: step 1/1 \(100%\), loss \d\.\d{4}, \d+ s so far", out)


@pytest.mark.slow
def test_the_report_on_the_random_tiny_base_renders_nothing_and_says_why(quiet_run):
    output, out, _ = quiet_run
    why = "the base 'tiny' has random weights (a test model), so its images are noise"
    assert f"report: skipping the renders: {why}" in out
    assert "report: rendering" not in out
    report = json.loads((output / "report.json").read_text())
    assert report["renders_skipped"].startswith(why)
    assert (report["grid"], report["style_score"], report["off_style_loss"]) == (None, None, None)
    assert report["heldout_style_loss"]["base"] > 0  # the loss is still measured
    assert (output / "report.png").is_file() and not (output / "report_grid.png").exists()
    assert f"not rendered: {why}" in out  # in the verdict the command prints at the end


@pytest.mark.slow
def test_each_loss_figure_names_the_images_it_is_on(quiet_run):
    output, out, _ = quiet_run
    # The training command's before/after figure, and the report's style loss: both on
    # training images here (no held-out set), and said so; never "held-out" for them.
    assert re.search(r"trained 1 step in \d+ s; loss on 4 training images \(fixed noise\), "
                     r"before -> after: \d\.\d{4} -> \d\.\d{4}", out), out
    assert re.search(r"style loss on 4 training images \(no held-out set\): \d\.\d{4} -> ", out)
    assert "held-out style loss" not in out
    report = json.loads((output / "report.json").read_text())
    assert report["heldout_style_loss"]["name"] == "4 training images (no held-out set)"


def test_a_held_out_folder_is_named_as_held_out():
    from sd_lora.train.report import folder_images
    from sd_lora.train.report_plot import verdict_lines

    held = folder_images(str(SAMPLE_DATA), 64, 2, (".txt",), "held-out")
    assert held.name == "2 held-out images" and held.pixels.shape == (2, 3, 64, 64)
    loss = {"name": held.name, "base": 0.2, "adapter": 0.1, "change": -0.5}
    lines = verdict_lines({"heldout_style_loss": loss, "off_style_loss": None, "style_score": None})
    assert lines == ["style loss on 2 held-out images: 0.2000 -> 0.1000 (-50.0%; lower is better)"]


@pytest.mark.slow
def test_with_bars_the_samples_and_the_evaluation_show_their_counts(tmp_path):
    out, err = run_train(tmp_path / "run")
    assert "samples: rendering 3 images (samples/final.png) ..." in out
    assert re.search(r"samples: +\d+%\|[^|]*\| [0-3]/3 \[", err), err  # tqdm: count of total
    assert re.search(r"evaluation: +\d+%\|[^|]*\| [0-3]/3 \[", err)  # 4 images x 5 steps / 8
    assert re.search(r"training: +\d+%\|", err)
