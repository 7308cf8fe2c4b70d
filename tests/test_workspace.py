"""The app's folders: names that try to leave them are refused; listings never raise."""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sd_lora.adapters.files import read_safetensors, save_adapter
from sd_lora.errors import UserError
from sd_lora.formats.metadata import TrainingInfo
from sd_lora.lora.inject import add_lora, read_adapter_state
from sd_lora.models.builtin.tiny import build_tiny_pipeline
from sd_lora.models.families import model_family
from sd_lora.services import workspace as ws
from sd_lora.services.workspace import (
    PathOutsideError,
    Workspace,
    WorkspaceError,
    extract_zip,
    list_adapters,
    list_bases,
    resolve_base,
)
from tests.lora_helpers import fill_lora_B


def make_adapter_file(path: Path, pipe=None, seed: int = 1, info: TrainingInfo | None = None,
                      r: int = 4, alpha: float = 2.0, scale: float = 1.0) -> Path:
    """A real adapter: LoRA injected into a (fresh) tiny pipeline, lora_B filled at random."""
    pipe = pipe if pipe is not None else build_tiny_pipeline()
    add_lora(pipe.unet, "unet", ("attn",), r, alpha)
    add_lora(pipe.text_encoder, "text_encoder", ("attn",), 2, 2.0)
    fill_lora_B((pipe.unet, pipe.text_encoder), seed, scale)
    state = read_adapter_state({"unet": pipe.unet, "text_encoder": pipe.text_encoder},
                               model_family(pipe))
    return save_adapter(state, path, info=info, dtype=torch.float32)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    (tmp_path / "models").mkdir()
    return Workspace.create(tmp_path / "adapters", models=tmp_path / "models")


def test_create_makes_the_writable_folders(tmp_path):
    space = Workspace.create(tmp_path / "a" / "adapters")
    assert space.outputs == tmp_path / "a" / "outputs" and space.outputs.is_dir()
    assert space.runs == tmp_path / "a" / "runs" and space.runs.is_dir()
    assert space.models is None
    with pytest.raises(WorkspaceError, match="models folder .*nope does not exist"):
        Workspace.create(tmp_path / "adapters", models=tmp_path / "nope")


@pytest.mark.parametrize(
    "name", ["../x.safetensors", "a/../../x", "/etc/passwd", "\\\\server\\x", "C:\\x", "a\x00b", ""]
)
def test_resolve_refuses_names_that_leave_the_folder(workspace, name):
    with pytest.raises(PathOutsideError) as info:
        workspace.resolve("adapters", name)
    assert isinstance(info.value, UserError)


def test_resolve_refuses_symlinks_pointing_out_and_follows_those_inside(workspace, tmp_path):
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    (workspace.adapters / "evil.safetensors").symlink_to(outside)
    (workspace.adapters / "evil_dir").symlink_to(tmp_path)
    with pytest.raises(PathOutsideError, match="outside"):
        workspace.resolve("adapters", "evil.safetensors")
    with pytest.raises(PathOutsideError, match="outside"):
        workspace.resolve("adapters", "evil_dir/secret.safetensors")
    (workspace.adapters / "real.safetensors").write_bytes(b"x")
    (workspace.adapters / "alias.safetensors").symlink_to(workspace.adapters / "real.safetensors")
    assert workspace.resolve("adapters", "alias.safetensors") == workspace.adapters / "real.safetensors"
    assert workspace.resolve("adapters", "sub/new.safetensors") == workspace.adapters / "sub/new.safetensors"


def test_list_adapters_reads_headers_and_reports_bad_files(workspace, tmp_path):
    info = TrainingInfo(name="style", tag_frequency={"1_a": {"zkstripes": 9, "red": 4, "blue": 3},
                                                     "1_b": {"blue": 2, "x": 1, "y": 1, "z": 1}})
    good = make_adapter_file(workspace.adapters / "style.safetensors", info=info)
    (workspace.adapters / "style.preview.png").write_bytes(b"png")
    (workspace.adapters / "sub").mkdir()
    shutil.copy(good, workspace.adapters / "sub" / "copy.safetensors")
    (workspace.adapters / "sub" / "copy.png").write_bytes(b"png")
    blob = good.read_bytes()
    (workspace.adapters / "broken.safetensors").write_bytes(blob[: len(blob) // 2])
    (workspace.adapters / "notes.txt").write_text("ignored")
    tensors, _ = read_safetensors(good)  # no metadata, and a 32-wide context no family has
    save_file(tensors, workspace.adapters / "bare.safetensors")
    (workspace.adapters / ".hidden.safetensors").write_bytes(blob)
    (tmp_path / "outside.safetensors").write_bytes(blob)
    (workspace.adapters / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "far.safetensors").write_bytes(blob)
    (workspace.adapters / "linked_dir").symlink_to(tmp_path / "elsewhere")

    listed = {a.name: a for a in list_adapters(workspace)}
    assert list(listed) == ["bare", "broken", "link", "style", "sub/copy"]
    assert listed["bare"].format == "kohya" and listed["bare"].family is None
    assert "states no base family" in listed["bare"].problem
    assert (listed["bare"].rank, listed["bare"].alpha) == (4, 2.0)  # the most common module
    style = listed["style"]
    assert (style.family, style.format, style.rank, style.alpha) == ("sd1", "kohya", 4, 2.0)
    assert style.trigger_words == ["zkstripes", "blue", "red"]  # x, y, z: one image each
    assert style.preview == workspace.adapters / "style.preview.png" and style.problem is None
    assert listed["sub/copy"].preview == workspace.adapters / "sub" / "copy.png"
    assert "not a readable safetensors file" in listed["broken"].problem
    assert "outside" in listed["link"].problem and listed["link"].family is None


def test_list_and_resolve_bases(workspace, tmp_path):
    models = workspace.models
    (models / "sd15").mkdir()
    (models / "sd15" / "model_index.json").write_text("{}")
    (models / "sd15" / "unet").mkdir()
    (models / "sd15" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (models / "checkpoints").mkdir()
    (models / "checkpoints" / "v1-5.safetensors").write_bytes(b"x")
    (models / "old.ckpt").write_bytes(b"x")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    (models / "out.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    assert list_bases(workspace) == ["toy", "tiny", "tiny-sdxl", "tiny-sd3", "checkpoints/v1-5.safetensors", "sd15"]
    assert resolve_base(workspace, "toy") == "toy"

    assert resolve_base(workspace, "tiny") == "tiny"
    assert resolve_base(workspace, "sd15") == str(models / "sd15")
    # A hub id goes to the loader as hf://org/name: never looked up on disk (not in the working
    # directory, where a folder of that name would otherwise be loaded).
    assert resolve_base(workspace, "runwayml/stable-diffusion-v1-5") == "hf://runwayml/stable-diffusion-v1-5"
    assert resolve_base(workspace, "hf://acme/sd") == "hf://acme/sd"
    for bad in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors"), "out.safetensors"):
        with pytest.raises(PathOutsideError):
            resolve_base(workspace, bad)
    with pytest.raises(WorkspaceError, match="'missing.safetensors' is not in the models folder"):
        resolve_base(workspace, "missing.safetensors")


def _zip(path: Path, entries: dict[str, bytes], links: dict[str, str] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in dict(links).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def test_extract_zip_unpacks_into_runs_uploads(workspace, tmp_path):
    upload = _zip(tmp_path / "up.zip", {"imgs/0.png": b"a", "imgs/0.txt": b"cap", "top.txt": b"t"})
    folder = extract_zip(workspace, upload, "mydata")
    assert folder == workspace.runs / "uploads" / "mydata"
    assert (folder / "imgs" / "0.txt").read_bytes() == b"cap"
    with pytest.raises(WorkspaceError, match="already exists"):
        extract_zip(workspace, upload, "mydata")


@pytest.mark.parametrize(
    "entries, links, named",
    [
        ({"../evil.txt": b"x"}, {}, "contains '..'"),
        ({"ok/../../evil.txt": b"x"}, {}, "contains '..'"),
        ({"/etc/evil.txt": b"x"}, {}, "absolute"),
        ({"C:/evil.txt": b"x"}, {}, "absolute"),
        ({"a.txt": b"x"}, {"link": "/etc/passwd"}, "symlink"),
    ],
)
def test_extract_zip_refuses_unsafe_entries_and_writes_nothing(workspace, tmp_path, entries, links, named):
    upload = _zip(tmp_path / "bad.zip", entries, links)
    with pytest.raises(PathOutsideError, match=named):
        extract_zip(workspace, upload, "bad")
    uploads = workspace.runs / "uploads"
    assert not uploads.exists() or os.listdir(uploads) == []
    assert not (tmp_path / "evil.txt").exists()


def test_extract_zip_limits_and_bad_names(workspace, tmp_path, monkeypatch):
    upload = _zip(tmp_path / "many.zip", {f"{i}.txt": b"0123456789" for i in range(5)})
    monkeypatch.setattr(ws, "ZIP_MAX_FILES", 4)
    with pytest.raises(WorkspaceError, match="5 entries; at most 4"):
        extract_zip(workspace, upload, "many")
    monkeypatch.setattr(ws, "ZIP_MAX_FILES", 10)
    monkeypatch.setattr(ws, "ZIP_MAX_BYTES", 40)
    with pytest.raises(WorkspaceError, match="50 bytes uncompressed; at most 40 allowed"):
        extract_zip(workspace, upload, "many")
    for name in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(WorkspaceError):
            extract_zip(workspace, upload, name)
    (tmp_path / "not.zip").write_bytes(b"nope")
    with pytest.raises(WorkspaceError, match="not a readable zip"):
        extract_zip(workspace, tmp_path / "not.zip", "x")


def test_datasets_folder_is_an_area_of_its_own(tmp_path):
    with pytest.raises(WorkspaceError, match="datasets folder .* does not exist"):
        Workspace.create(tmp_path / "adapters", datasets=tmp_path / "missing")
    (tmp_path / "pictures" / "set").mkdir(parents=True)
    space = Workspace.create(tmp_path / "adapters", datasets=tmp_path / "pictures")
    assert space.contains(tmp_path / "pictures" / "set")
    assert space.resolve("datasets", "set") == (tmp_path / "pictures" / "set").resolve()
    with pytest.raises(PathOutsideError):
        space.resolve("datasets", "../adapters")
