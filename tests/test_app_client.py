"""The app's named endpoints through gradio_client, against the app running in-process on a free
127.0.0.1 port: tiny base, small random adapters, 64 px images, few steps."""

from __future__ import annotations

import time
import zipfile

import numpy as np
import pytest
from PIL import Image
from sd_lora_app.common import NUM_SLOTS
from sd_lora_app.forms import FORM_PARAMS

from sd_lora.cli.main import main as cli_main
from tests.app_helpers import PROMPT, make_workspace, running_app

gradio_client = pytest.importorskip("gradio_client")
AppError = gradio_client.exceptions.AppError

STEPS = 3


def form(*adapters, seed=7, steps=STEPS, base="tiny", sampler="Euler a", blocks=None, **changes):
    """The Generate form's values: settings, then NUM_SLOTS (name, unet, te, blocks) slots."""
    settings = dict(base=base, prompt=PROMPT, negative_prompt="", seed=seed, steps=steps,
                    guidance=5.0, width=0, height=0, sampler=sampler, batch_count=1)
    settings.update(changes)
    slots = []
    for i in range(NUM_SLOTS):
        if i < len(adapters):
            name, unet, te = adapters[i]
            slots += [name, unet, te, (blocks or {}).get(name, "")]
        else:
            slots += ["", 1.0, 1.0, ""]
    values = list(settings.values()) + slots
    assert len(values) == len(FORM_PARAMS)
    return values


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    paths = make_workspace(root)
    with running_app(root) as (url, workspace):
        client = gradio_client.Client(url, verbose=False)
        yield client, workspace, paths


def generate(client, values):
    gallery, parameters, selected, *_ = client.predict(*values, api_name="/generate")
    return gallery, parameters, selected


def test_generate_two_adapters_matches_the_cli(app, tmp_path):
    client, workspace, paths = app
    values = form(("style", 0.8, 0.8), ("detail", -0.4, 0.5))
    gallery, parameters, selected = generate(client, values)
    assert len(gallery) == 1 and gallery[0]["caption"] == "seed 7"
    assert "<lora:style:0.8> <lora:detail:0.5:-0.4>" in parameters
    assert "Lora hashes:" in parameters and "Seed: 7" in parameters
    saved = workspace.outputs / selected
    assert saved.is_file() and Image.open(saved).info["parameters"] == parameters
    # The same settings through `sd-lora generate` give the same pixels and the same text.
    cli_out = tmp_path / "cli.png"
    code = cli_main(["generate", "--base", "tiny", "--prompt", PROMPT, "--seed", "7", "--steps",
                     str(STEPS), "--guidance", "5", "--sampler", "euler_a", "--output", str(cli_out),
                     "--lora", f"{paths['adapters'] / 'style.safetensors'}:0.8",
                     "--lora", f"{paths['adapters'] / 'detail.safetensors'}:0.5:-0.4"])
    assert code == 0
    assert np.array_equal(pixels(cli_out), pixels(saved))
    assert np.array_equal(pixels(gallery[0]["image"]), pixels(saved))  # served unchanged (PNG)
    assert Image.open(cli_out).info["parameters"] == parameters


def test_changing_a_weight_changes_the_image_and_zero_weights_match_no_adapter(app):
    client, _, _ = app
    first = pixels(generate(client, form(("style", 1.0, 1.0)))[0][0]["image"])
    second = pixels(generate(client, form(("style", 0.3, 1.0)))[0][0]["image"])
    assert np.abs(first - second).max() > 0
    zero = pixels(generate(client, form(("style", 0.0, 0.0)))[0][0]["image"])
    none = pixels(generate(client, form())[0][0]["image"])
    assert np.array_equal(zero, none)
    # Block weights: NONE puts every block (text encoder included) at 0 -> no adapter at all;
    # INS keeps the input blocks only -> something between.
    blocked = form(("style", 1.0, 1.0), blocks={"style": "NONE"})
    assert np.array_equal(pixels(generate(client, blocked)[0][0]["image"]), none)
    ins = pixels(generate(client, form(("style", 1.0, 1.0), blocks={"style": "INS"}))[0][0]["image"])
    assert not np.array_equal(ins, none) and not np.array_equal(ins, first)


def test_random_seed_batch_and_send_back(app):
    client, _, _ = app
    values = form(("style", 0.7, 0.6), seed=-1, batch_count=2, sampler="DPM++ 2M")
    gallery, _, selected = generate(client, values)
    seeds = [int(item["caption"].split()[1]) for item in gallery]
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1
    restored = client.predict(selected, api_name="/send_back")
    *settings, note = restored
    assert "restored" in note
    expected = form(("style", 0.7, 0.6), seed=seeds[0], sampler="DPM++ 2M", width=64, height=64)
    assert settings == expected
    # The restored form reproduces the image exactly.
    again = generate(client, settings)[0][0]["image"]
    assert np.array_equal(pixels(again), pixels(gallery[0]["image"]))


def test_png_info_upload_and_bad_files(app, tmp_path):
    client, workspace, _ = app
    _, _, selected = generate(client, form(("detail", 0.5, 0.25), seed=11))
    restored = client.predict(gradio_client.handle_file(str(workspace.outputs / selected)),
                              api_name="/png_info")
    assert restored[3] == 11 and list(restored[10:13]) == ["detail", 0.5, 0.25]
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(AppError, match="carries no 'parameters' text"):
        client.predict(gradio_client.handle_file(str(plain)), api_name="/png_info")
    with pytest.raises(AppError, match="contains '..'"):
        client.predict("../adapters/style.preview.png", api_name="/send_back")


def test_adapter_info_and_flags_before_generating(app):
    client, _, _ = app
    info, preview = client.predict("style", api_name="/adapter_info")
    assert "base **sd1**" in info and "rank 4" in info
    assert "`zkstripes`, `stripes`, `red`" in info
    assert preview is not None and Image.open(preview).size == (32, 32)
    broken, _ = client.predict("broken", api_name="/adapter_info")
    assert "not a readable safetensors file" in broken
    warning = client.predict("tiny", "style", "sd2style", "broken", "", api_name="/check_adapters")
    assert "sd2style** was made for an **sd2** base" in warning
    assert "broken** cannot be used" in warning and "style**" not in warning.replace("sd2style", "")
    assert client.predict("tiny", "style", "detail", "", "", api_name="/check_adapters") == ""


def test_an_adapter_with_nan_values_is_flagged_when_chosen_and_refused(app):
    """Its header is fine (the listing reads headers only); choosing it checks its values."""
    import safetensors.torch

    client, workspace, paths = app
    tensors = safetensors.torch.load_file(paths["adapters"] / "style.safetensors")
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
    tensors[key][0, 0] = float("nan")
    safetensors.torch.save_file(tensors, paths["adapters"] / "nanstyle.safetensors",
                                metadata={"ss_base_model_version": "sd_v1"})
    try:
        info, _ = client.predict("nanstyle", api_name="/adapter_info")
        assert info.startswith("⚠ **nanstyle**") and f"tensor '{key}' holds 1 NaN/inf" in info
        warning = client.predict("tiny", "style", "nanstyle", "", "", api_name="/check_adapters")
        assert "nanstyle** cannot be used" in warning and "black images" in warning
        with pytest.raises(AppError, match=f"adapter 'nanstyle'.*tensor '{key}' holds 1 NaN/inf"):
            client.predict(*form(("nanstyle", 1.0, 1.0)), api_name="/generate")
    finally:
        (paths["adapters"] / "nanstyle.safetensors").unlink()
    assert len(generate(client, form(("style", 0.5, 0.5)))[0]) == 1  # the app keeps working


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (form(("sd2style", 1.0, 1.0)), "trained for sd2 but the base 'tiny' is sd1"),
        (form(("broken", 1.0, 1.0)), "adapter 'broken'.*not a readable safetensors file"),
        (form(("missing", 1.0, 1.0)), "adapter 'missing': no file missing.safetensors"),
        (form(("../outputs/x", 1.0, 1.0)), "contains '..'"),
        (form(("style", 1.0, 1.0), blocks={"style": "1,2,x"}), "block weights"),
        (form(steps=500), "500"),
        (form(base="../elsewhere"), "contains '..'"),
        (form(width=100), "width = 100 must be a multiple of 8"),
    ],
)
def test_bad_input_is_a_readable_error_and_the_app_keeps_working(app, values, message):
    client, _, _ = app
    with pytest.raises(AppError, match=message):
        client.predict(*values, api_name="/generate")
    gallery, _, _ = generate(client, form(("style", 0.5, 0.5)))
    assert len(gallery) == 1


def test_compare_and_xy_grid(app):
    client, _, _ = app
    values = form(("style", 0.8, 0.8), ("detail", -0.4, 0.5))
    image, labels = client.predict(*values, api_name="/compare")
    assert labels.split(" | ")[0] == "no adapters" and labels.split(" | ")[-1].startswith("blend")
    assert Image.open(image).width == 4 * 128  # none, style, detail, blend; 64 px cells enlarged
    grid = client.predict("style", "0, 0.5, 1", "1, 2", *values, api_name="/xy_grid")
    assert Image.open(grid).size[0] == 3 * 128 and Image.open(grid).size[1] > 2 * 128
    with pytest.raises(AppError, match="'x' is not a number"):
        client.predict("style", "0, x", "1", *values, api_name="/xy_grid")


def test_dataset_zip_upload_and_escape_attempts(app, tmp_path):
    client, workspace, _ = app
    report, images = client.predict("datasets/stripes", "", api_name="/dataset")
    assert "4 images" in report and "broken.png" in report and "notes.txt.bak" in report
    assert "Plan:" not in report  # no job TOML: the dataset's report alone
    job = 'version = 1\n[data]\npath = "x"\n[train]\nmax_steps = 12\nbatch_size = 2\n'
    report, _ = client.predict("datasets/stripes", job, api_name="/dataset")
    assert "4 images (4 items per epoch)" in report and "12 steps of 2 images: 6.0 epochs" in report
    report, _ = client.predict("datasets/stripes", "[train\nbroken", api_name="/dataset")
    assert "4 images" in report and "Plan:" not in report  # a TOML being edited is left alone
    assert len(images) == 4 and all(item["caption"].startswith("zkstripes") for item in images)
    archive = tmp_path / "my set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for image in sorted((workspace.runs / "datasets" / "stripes").glob("000[01].*")):
            zf.write(image, f"pics/{image.name}")
    choice, report, images = client.predict(gradio_client.handle_file(str(archive)),
                                            api_name="/upload_zip")
    assert choice["value"] == "uploads/my_set" and len(images) == 2
    assert (workspace.runs / "uploads" / "my_set" / "pics" / "0000.png").is_file()
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.txt", "x")
    with pytest.raises(AppError, match="contains '..'"):
        client.predict(gradio_client.handle_file(str(evil)), api_name="/upload_zip")
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(AppError, match="contains '..'"):
        client.predict("../../etc", "", api_name="/dataset")
    with pytest.raises(AppError, match="not a folder inside"):
        client.predict("/etc", "", api_name="/dataset")


def wait_for(client, job_id, states, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress, status, *_ = client.predict(job_id, api_name="/train_status")
        if any(f"**{s}**" in status for s in states):
            return progress, status
        time.sleep(1)
    raise AssertionError(f"job {job_id} not {states} after {timeout} s: {status}")


def job_toml(steps: int, name: str) -> str:
    from sd_lora.services.jobs import preset_toml

    return preset_toml("quick", "tiny", "", name, [f"train.max_steps={steps}", "train.batch_size=2",
                                                  "sample.steps=2", "train.checkpoint_every=1"])


def test_train_job_finishes_and_its_adapter_is_listed(app):
    client, workspace, _ = app
    job, note = client.predict("datasets/stripes", job_toml(3, "fresh"), "fresh",
                               api_name="/train_start")
    assert "started job" in note
    job_id = note.split("**")[1]
    progress, status = wait_for(client, job_id, ["done", "failed"])
    assert "**done**" in status, status
    assert 'data-state="done"' in progress and "step 3/3" in progress
    assert (workspace.adapters / "fresh.safetensors").is_file()
    info, preview = client.predict("fresh", api_name="/adapter_info")
    assert "base **sd1**" in info and preview is not None
    gallery, parameters, _ = generate(client, form(("fresh", 1.0, 1.0)))
    assert "<lora:fresh:1>" in parameters
    with pytest.raises(AppError, match="already exists"):
        client.predict("datasets/stripes", job_toml(3, "fresh"), "fresh", api_name="/train_start")


def test_cancel_keeps_a_checkpoint(app):
    client, workspace, _ = app
    _, note = client.predict("datasets/stripes", job_toml(400, "long"), "long",
                             api_name="/train_start")
    job_id = note.split("**")[1]
    deadline = time.monotonic() + 180
    while not list((workspace.runs / job_id).glob("checkpoint-*")):
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(1)
    assert "cancelling" in client.predict(job_id, api_name="/train_cancel")
    _, status = wait_for(client, job_id, ["cancelled", "failed", "done"])
    assert "**cancelled**" in status, status
    assert list((workspace.runs / job_id).glob("checkpoint-*"))
    assert not (workspace.adapters / "long.safetensors").exists()
    with pytest.raises(AppError, match="not running"):
        client.predict(job_id, api_name="/train_cancel")


def test_weight_changes_never_reload_the_base_and_requests_queue(app, monkeypatch):
    import sd_lora.services.session

    client, _, _ = app
    generate(client, form(("style", 1.0, 1.0)))  # the base is loaded now
    loads = []
    original = sd_lora.services.session.load_pipeline
    monkeypatch.setattr(sd_lora.services.session, "load_pipeline", lambda *a, **k: loads.append(a) or original(*a, **k))
    weights = [0.2, 0.6, 1.0, -0.5]
    # Submitted together: they queue (one model, one at a time) and each gets its own result.
    jobs = [client.submit(*form(("style", w, w), ("detail", 0.5, 0.5)), api_name="/generate")
            for w in weights]
    together = [pixels(job.result()[0][0]["image"]) for job in jobs]
    alone = [pixels(generate(client, form(("style", w, w), ("detail", 0.5, 0.5)))[0][0]["image"])
             for w in weights]
    assert loads == []
    for a, b in zip(together, alone):
        assert np.array_equal(a, b)
    assert not np.array_equal(together[0], together[1])


def test_auth_and_the_command_line(tmp_path, capsys, monkeypatch):
    import os
    import tempfile

    from sd_lora_app.server import parse_auth

    # launch() points the temporary folders at the workspace, process-wide: put them back after.
    for name in ("GRADIO_TEMP_DIR", "TMPDIR", "MPLCONFIGDIR"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)

    assert parse_auth("me:se:cret") == ("me", "se:cret")
    assert cli_main(["app", "--adapters", str(tmp_path / "a"), "--auth", "nopassword"]) == 2
    assert "--auth 'nopassword': give USER:PASSWORD" in capsys.readouterr().err
    assert cli_main(["app", "--adapters", str(tmp_path / "a"), "--models", str(tmp_path / "none")]) == 2
    assert "models folder" in capsys.readouterr().err
    from sd_lora_app.server import launch

    from sd_lora.services.workspace import Workspace
    from tests.app_helpers import free_port

    demo, url = launch(Workspace.create(tmp_path / "adapters"), port=free_port(), block=False,
                       auth=("me", "secret"), quiet=True)
    try:
        assert url.startswith("http://127.0.0.1:")
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises a plain ValueError here
            gradio_client.Client(url, verbose=False)
        # Every API route answers 401 without the login (the page itself is the login form).
        import urllib.error
        import urllib.request

        routes = [("GET", "/config"), ("GET", "/gradio_api/info"),
                  ("POST", "/gradio_api/queue/join"), ("POST", "/gradio_api/call/generate"),
                  ("POST", "/gradio_api/upload"), ("GET", f"/gradio_api/file={tmp_path}")]
        for method, route in routes:
            request = urllib.request.Request(url.rstrip("/") + route, method=method,
                                             data=b"{}" if method == "POST" else None,
                                             headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401, (method, route, refused.value.code)
        client = gradio_client.Client(url, auth=("me", "secret"), verbose=False)
        assert client.predict("", api_name="/adapter_info")[0] == ""
    finally:
        demo.close()


@pytest.mark.slow
def test_fifty_concurrent_requests_complete_in_queue_order_with_bounded_memory(app, monkeypatch):
    """50 generate requests at once (one with a broken adapter): each joins the queue before the
    next is sent; they run in that order, one at a time; the bad one fails alone; the process
    grows by a bounded amount."""
    import psutil
    from gradio_client.utils import Status

    from sd_lora.services.session import GenerationSession

    client, _, _ = app
    generate(client, form(("style", 1.0, 1.0)))  # warm: the base and adapters are loaded
    process = psutil.Process()
    rss_before = process.memory_info().rss
    served = []
    real = GenerationSession.generate
    monkeypatch.setattr(GenerationSession, "generate",
                        lambda self, request: served.append(request.seed) or real(self, request))
    bad = 25
    jobs = []
    for i in range(50):
        adapters = [("broken", 1.0, 1.0)] if i == bad else [("style", 0.5, 0.5)]
        job = client.submit(*form(*adapters, seed=1000 + i), api_name="/generate")
        deadline = time.monotonic() + 30
        while job.status().code in (Status.STARTING, Status.JOINING_QUEUE):
            assert time.monotonic() < deadline, f"request {i} never joined the queue"
            time.sleep(0.01)
        jobs.append(job)
    seeds = []
    for i, job in enumerate(jobs):
        if i == bad:
            with pytest.raises(AppError, match="adapter 'broken'"):
                job.result(timeout=300)
            continue
        gallery = job.result(timeout=300)[0]
        seeds.append(int(gallery[0]["caption"].split()[-1]))
    assert seeds == [1000 + i for i in range(50) if i != bad]  # each got its own image
    assert served == [1000 + i for i in range(50)]  # served in the order they queued
    grown = (process.memory_info().rss - rss_before) / 2**20
    print(f"memory growth over 50 requests: {grown:.0f} MiB")
    assert grown < 300, grown
    gallery, _, _ = generate(client, form(("style", 1.0, 1.0)))  # and the app still works
    assert len(gallery) == 1


def component(client, elem_id: str) -> dict:
    """A component's properties as the page was built (gradio_client's copy of the config)."""
    return next(c["props"] for c in client.config["components"]
                if c.get("props", {}).get("elem_id") == elem_id)


def test_generate_and_the_app_default_to_one_sampler_with_the_same_pixels(app, tmp_path):
    from sd_lora.cli.main import build_parser
    from sd_lora.models.schedulers import sampler_name

    client, workspace, paths = app
    app_default = component(client, "gen-sampler")["value"]
    cli_default = build_parser().parse_args(["generate", "--prompt", PROMPT]).sampler
    assert sampler_name(cli_default) == sampler_name(app_default)
    _, _, selected = generate(client, form(("style", 0.8, 0.8), sampler=app_default))
    cli_out = tmp_path / "cli.png"
    assert cli_main(["generate", "--base", "tiny", "--prompt", PROMPT, "--seed", "7", "--steps",
                     str(STEPS), "--guidance", "5", "--output", str(cli_out),  # no --sampler
                     "--lora", f"{paths['adapters'] / 'style.safetensors'}:0.8"]) == 0
    assert np.array_equal(pixels(cli_out), pixels(workspace.outputs / selected))


def test_an_a1111_tag_in_an_adapter_box_uses_its_strengths(app):
    client, _, _ = app
    for tag, unet, te in (("<lora:style:0.8>", 0.8, 0.8), ("<lora:style:0.5:-0.4>", -0.4, 0.5)):
        tagged, parameters, _ = generate(client, form((tag, 1.0, 1.0)))
        plain, _, _ = generate(client, form(("style", unet, te)))
        assert tag in parameters
        assert np.array_equal(pixels(tagged[0]["image"]), pixels(plain[0]["image"]))
    info, _ = client.predict("<lora:style:0.8>", api_name="/adapter_info")
    assert info.startswith("**style**") and "base **sd1**" in info
    with pytest.raises(AppError, match="adapter 'nothere': no file nothere.safetensors"):
        client.predict(*form(("<lora:nothere:1>", 1.0, 1.0)), api_name="/generate")
