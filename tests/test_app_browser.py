"""End to end in a real browser: Debian's chromium driven by the playwright Python package.

What a person does: load the page, pick two adapters, set weights, generate, change a weight and
see the image change; the image equals `sd-lora generate` with the same settings; compare and
X/Y grid; start a short training run, close the page, reopen it, see the run finish and its
adapter appear. A screenshot of each tab is kept in test-artifacts/.

Skips (with the reason) only where no browser can run: the playwright package or chromium
missing (`make test` installs Debian's chromium when apt-get is available).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_lora.cli.main import main as cli_main
from tests.app_helpers import PROMPT, make_workspace, running_app

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = (os.environ.get("SD_LORA_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
STEPS = 3
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


@pytest.fixture(scope="module")
def browser():
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no chromium found (looked for {CHROMIUM}): install Debian's with "
                    "`apt-get install -y chromium` (make test does when it can) or set "
                    "SD_LORA_CHROMIUM to a chromium binary")
    with sync_api.sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except sync_api.Error as exc:
            pytest.skip(f"chromium at {CHROMIUM} does not start here: {str(exc).splitlines()[0]}")
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-app")
    paths = make_workspace(root)
    with running_app(root) as (url, workspace):
        yield url, workspace, paths


def open_page(browser, url, base: str | None = "tiny"):
    """The app's page; `base` is chosen on the Generate tab (the test adapters were trained on
    `tiny`; the page opens with the first built-in base, `toy`)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#gen-run")
    sync_api.expect(page.locator("#gen-base input")).to_have_value("toy")
    if base:
        choose(page, "#gen-base", base)
    return page


def screenshot(page, name: str) -> None:
    """A full-page PNG in test-artifacts/, palette-reduced to stay small for the README."""
    ARTIFACTS.mkdir(exist_ok=True)
    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    image.quantize(colors=128).save(ARTIFACTS / f"{name}.png", optimize=True)


def choose(page, dropdown: str, option: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.locator(f'{dropdown} [role=option][aria-label="{option}"]').click()


def expect_error(page, pattern: str) -> None:
    """An error message shows in the page; then close it, as a person would (the message box
    sits over the Generate button)."""
    sync_api.expect(page.get_by_text(re.compile(pattern)).first).to_be_visible()
    for button in page.locator(".toast-close").all():
        if button.is_visible():
            button.click()
    sync_api.expect(page.locator(".toast-close")).to_have_count(0)


def text(page, selector: str):
    """A Textbox's field (Gradio renders a textarea, or an input for some types)."""
    return page.locator(f"{selector} textarea, {selector} input").first


def set_number(page, selector: str, value) -> None:
    field = page.locator(f"{selector} input[type=number]").first
    field.fill(str(value))
    field.press("Enter")
    field.blur()


def gallery_image(page, previous: str | None = None) -> tuple[str, np.ndarray]:
    """The src of the gallery's first image (waiting for a new one) and its pixels."""
    image = page.locator("#gen-gallery img").first
    image.wait_for()
    if previous is not None:
        page.wait_for_function(
            "prev => { const i = document.querySelector('#gen-gallery img'); return i && i.src !== prev; }",
            arg=previous)
    src = page.locator("#gen-gallery img").first.get_attribute("src")
    body = page.request.get(src).body()
    return src, np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.int16)


def test_generate_with_two_adapters_in_the_browser(browser, app, tmp_path):
    url, workspace, paths = app
    page = open_page(browser, url)
    text(page, "#gen-prompt").fill(PROMPT)
    set_number(page, "#gen-seed", 7)
    set_number(page, "#gen-steps", STEPS)
    set_number(page, "#gen-guidance", 5)
    choose(page, "#lora-0-name", "style")
    choose(page, "#lora-1-name", "detail")
    set_number(page, "#lora-1-unet", -0.4)
    set_number(page, "#lora-1-te", 0.5)
    sync_api.expect(page.locator("#lora-0-info")).to_contain_text("zkstripes")
    sync_api.expect(page.locator("#lora-0-info")).to_contain_text("sd1")
    sync_api.expect(page.locator("#lora-0-preview img")).to_be_visible()
    # An adapter for another base family is flagged as soon as it is chosen.
    choose(page, "#lora-2-name", "sd2style")
    sync_api.expect(page.locator("#gen-warning")).to_contain_text("made for an sd2 base")
    choose(page, "#lora-2-name", "(none)")
    sync_api.expect(page.locator("#gen-warning")).not_to_contain_text("sd2")

    page.click("#gen-run")
    src, first = gallery_image(page)
    sync_api.expect(text(page, "#gen-parameters")).to_have_value(
        re.compile(r"<lora:style:1> <lora:detail:0\.5:-0\.4>"))
    # The same settings through `sd-lora generate`: the same pixels.
    out = tmp_path / "cli.png"
    assert cli_main(["generate", "--base", "tiny", "--prompt", PROMPT, "--seed", "7", "--steps",
                     str(STEPS), "--guidance", "5", "--sampler", "euler_a", "--output", str(out),
                     "--lora", f"{paths['adapters'] / 'style.safetensors'}:1",
                     "--lora", f"{paths['adapters'] / 'detail.safetensors'}:0.5:-0.4"]) == 0
    assert np.array_equal(first, np.asarray(Image.open(out).convert("RGB"), dtype=np.int16))

    page.click("#gen-seed-random")
    sync_api.expect(page.locator("#gen-seed input")).to_have_value("-1")
    page.click("#gen-seed-reuse")
    sync_api.expect(page.locator("#gen-seed input")).to_have_value("7")

    set_number(page, "#lora-0-unet", 0.3)
    page.click("#gen-run")
    _, second = gallery_image(page, previous=src)
    assert np.abs(first - second).max() > 0, "changing a weight did not change the image"
    screenshot(page, "generate")

    # Send parameters back: the selected image's settings return to the form.
    set_number(page, "#gen-seed", -1)
    set_number(page, "#lora-0-unet", 2)
    page.click("#gen-send-back")
    sync_api.expect(page.locator("#gen-seed input")).to_have_value("7")
    sync_api.expect(page.locator("#lora-0-unet input[type=number]")).to_have_value("0.3")
    sync_api.expect(page.locator("#gen-status")).to_contain_text("restored the settings")
    page.close()


def test_bad_input_shows_an_error_in_the_page(browser, app):
    url, _, _ = app
    page = open_page(browser, url)
    choose(page, "#lora-0-name", "broken (unreadable)")
    sync_api.expect(page.locator("#lora-0-info")).to_contain_text("not a readable safetensors file")
    set_number(page, "#gen-steps", 2)
    page.click("#gen-run")
    expect_error(page, "adapter 'broken'.*not a readable")
    choose(page, "#lora-0-name", "style")
    page.get_by_text("Advanced: per-block weights").click()
    choose(page, "#lora-0-preset", "INS")
    sync_api.expect(text(page, "#lora-0-blocks")).to_have_value("INS")
    text(page, "#lora-0-blocks").fill("1,2,x")
    page.click("#gen-run")
    expect_error(page, "blocks: block weights '1,2,x' has 3 values")
    text(page, "#lora-0-blocks").fill("OUTALL")
    page.click("#gen-run")  # the app keeps working
    gallery_image(page)
    page.close()


def test_compare_and_xy_grid_in_the_browser(browser, app):
    url, _, _ = app
    page = open_page(browser, url)
    text(page, "#gen-prompt").fill(PROMPT)
    set_number(page, "#gen-seed", 3)
    set_number(page, "#gen-steps", STEPS)
    choose(page, "#lora-0-name", "style")
    choose(page, "#lora-1-name", "detail")
    page.get_by_role("tab", name="Compare").click()
    page.click("#cmp-run")
    page.locator("#cmp-image img").wait_for()
    sync_api.expect(text(page, "#cmp-labels")).to_have_value(
        re.compile("no adapters .*blend"))
    choose(page, "#xy-adapter", "style")
    text(page, "#xy-weights").fill("0, 0.5, 1")
    page.click("#xy-run")
    page.locator("#xy-image img").wait_for()
    screenshot(page, "compare")
    page.close()


def test_train_from_the_page_survives_closing_it(browser, app):
    url, workspace, _ = app
    page = open_page(browser, url)
    page.get_by_role("tab", name="Train").click()
    choose(page, "#train-data", "datasets/stripes")
    page.click("#train-scan")
    sync_api.expect(text(page, "#train-report")).to_have_value(re.compile("broken.png"))
    # the plan from the job the page holds (the quick preset: 300 steps of 4 images)
    sync_api.expect(text(page, "#train-report")).to_have_value(
        re.compile(r"Plan: base .*300 steps of 4 images", re.S))
    sync_api.expect(page.locator("#train-dataset img")).to_have_count(4)
    text(page, "#train-name").fill("browser-lora")
    text(page, "#train-name").blur()
    set_number(page, "#train-steps", STEPS)
    page.get_by_text("Job TOML").click()
    sync_api.expect(text(page, "#train-toml")).to_have_value(re.compile(f"max_steps = {STEPS}\\b"))
    sync_api.expect(text(page, "#train-toml")).to_have_value(re.compile('name = "browser-lora"'))
    page.click("#train-start")
    sync_api.expect(page.locator("#train-status")).to_contain_text("started job")
    page.close()  # closing the browser does not stop the run

    page = open_page(browser, url)
    page.get_by_role("tab", name="Train").click()
    sync_api.expect(page.locator("#train-job input")).to_have_value(re.compile("browser-lora"))
    sync_api.expect(page.locator("#train-status")).to_contain_text("done", timeout=180_000)
    sync_api.expect(page.locator("#train-progress")).to_contain_text(f"step {STEPS}/{STEPS}")
    sync_api.expect(page.locator("#train-samples img").first).to_be_visible()
    sync_api.expect(page.locator("#train-loss canvas, #train-loss svg").first).to_be_visible()
    choose(page, "#train-data", "datasets/stripes")
    page.click("#train-scan")
    sync_api.expect(page.locator("#train-dataset img")).to_have_count(4)
    screenshot(page, "train")
    assert (workspace.adapters / "browser-lora.safetensors").is_file()
    # The new adapter is ready to blend on the Generate tab.
    page.get_by_role("tab", name="Generate").click()
    choose(page, "#lora-3-name", "browser-lora")
    sync_api.expect(page.locator("#lora-3-info")).to_contain_text("browser-lora")
    page.close()
