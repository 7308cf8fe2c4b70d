"""Shared by the app tests (gradio_client and browser): a workspace with small adapters, and the
app launched in-process on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from PIL import Image

from sd_lora.adapters.files import save_adapter
from sd_lora.lora.inject import add_lora, read_adapter_state
from tests.lora_helpers import fill_lora_B

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "datasets" / "sample_stripes"
PROMPT = "zkstripes, a red circle"


def make_adapter(path: Path, seed: int, family: str = "sd1", tags: dict | None = None,
                 scale: float = 0.3) -> Path:
    """A kohya adapter for the tiny base (or its SD 2 variant) with random nonzero weights."""
    if family == "sd2":
        from sd_lora.models.builtin.tiny_sdxl import build_tiny_sd2_pipeline

        pipe = build_tiny_sd2_pipeline()
    else:
        from sd_lora.models.builtin.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed=0)
    add_lora(pipe.unet, "unet", ("attn",), 4, 4.0)
    add_lora(pipe.text_encoder, "text_encoder", ("attn",), 4, 2.0)
    fill_lora_B((pipe.unet, pipe.text_encoder), seed, scale)
    state = read_adapter_state({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, family)
    state.metadata["ss_tag_frequency"] = json.dumps(tags or {"1_style": {"zkstripes": 9, "red": 4}})
    state.metadata["ss_output_name"] = path.stem
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_adapter(state, path, dtype=torch.float32)


def make_workspace(root: Path, dataset_images: int = 4) -> dict[str, Path]:
    """adapters/{style,detail,sd2style,broken}.safetensors, a preview, and a small dataset
    under runs/datasets/stripes."""
    adapters, runs = root / "adapters", root / "runs"
    (root / "models").mkdir(parents=True, exist_ok=True)  # no local bases: tiny and hub ids
    make_adapter(adapters / "style.safetensors", 1,
                 tags={"1_style": {"zkstripes": 12, "stripes": 7, "red": 2}})
    make_adapter(adapters / "detail.safetensors", 2, tags={"1_detail": {"zkdetail": 5}})
    make_adapter(adapters / "sd2style.safetensors", 3, family="sd2")
    (adapters / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00not a safetensors file")
    Image.new("RGB", (32, 32), (200, 40, 40)).save(adapters / "style.preview.png")
    data = runs / "datasets" / "stripes"
    data.mkdir(parents=True)
    for image in sorted(SAMPLE_DATA.glob("*.png"))[:dataset_images]:
        shutil.copy(image, data / image.name)
        caption = image.with_suffix(".txt")
        if caption.exists():
            shutil.copy(caption, data / caption.name)
    (data / "notes.txt.bak").write_text("not an image")  # listed as skipped
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return {"adapters": adapters, "outputs": root / "outputs", "runs": runs, "data": data}


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def process_folders_kept():
    """launch() points this process's temporary folders at the workspace (app.server.
    keep_files_inside): put them back afterwards, for the tests that follow."""
    names = ("GRADIO_TEMP_DIR", "TMPDIR", "MPLCONFIGDIR")
    saved, tempdir = {name: os.environ.get(name) for name in names}, tempfile.tempdir
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        tempfile.tempdir = tempdir


@contextlib.contextmanager
def running_app(root: Path, adapters: Path | None = None, quiet: bool = True):
    """The app on a free port (adapters: root/adapters unless given); yields (url, workspace);
    closes it after."""
    from sd_lora_app.server import launch

    from sd_lora.services.workspace import Workspace

    workspace = Workspace.create(adapters or root / "adapters", models=root / "models")
    with process_folders_kept():
        demo, url = launch(workspace, port=free_port(), block=False, quiet=quiet)
        try:
            yield url, workspace
        finally:
            demo.close()
