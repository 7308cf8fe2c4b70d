"""Pickle files (.ckpt, .pt): refused unless the user opts in; then read by torch's weights-only
unpickler, so a file that tries to run code is refused and the code never runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_lora.adapters.files import AdapterFileError, load_adapter, save_adapter
from sd_lora.cli.main import main
from sd_lora.models.bases import BaseModelError
from sd_lora.models.load import load_pipeline
from sd_lora.models.single_file import save_single_file
from sd_lora.util.pickles import PickleRefused, load_tensors
from tests.test_formats import assert_same_state, random_state
from tests.test_models import assert_same_outputs, conventional_pipeline


class RunsCode:
    """What a malicious checkpoint holds: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_file(tmp_path: Path, name: str) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / name
    with path.open("wb") as handle:
        pickle.dump({"state_dict": {"x": RunsCode(marker)}}, handle)
    return path, marker


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    path, marker = evil_file(tmp_path, "evil.ckpt")
    with pytest.raises(PickleRefused, match="weights-only unpickler"):
        load_tensors(path)
    with pytest.raises(AdapterFileError, match="evil.ckpt: refused by the weights-only"):
        load_adapter(path, allow_pickle=True)
    with pytest.raises(BaseModelError, match="evil.ckpt: refused by the weights-only"):
        load_pipeline(str(path), allow_pickle=True)
    assert not marker.exists()


def test_pickled_adapter_is_refused_by_default_and_read_as_tensors_when_allowed(tmp_path, tiny_pipe):
    state = random_state(tiny_pipe)
    kohya = save_adapter(state, tmp_path / "a.safetensors", dtype=torch.float32)
    tensors = load_file(kohya)
    pt = tmp_path / "a.pt"
    torch.save(tensors, pt)
    with pytest.raises(AdapterFileError, match="pass --allow-pickle"):
        load_adapter(pt)
    # No metadata in a pickle, and the tiny model's widths say no family: name it.
    assert_same_state(load_adapter(pt, allow_pickle=True, family="sd1"), load_adapter(kohya))


@pytest.mark.slow
def test_pickled_base_checkpoint_loads_like_its_safetensors_twin_when_allowed(tmp_path, capsys):
    # Pickles carry no metadata: a model whose shapes tell its config, as a real SD 1.5 does.
    original = conventional_pipeline("sd1")
    for name in ("unet", "vae", "text_encoder"):
        getattr(original, name).eval()
    single = save_single_file(original, tmp_path / "tiny.safetensors", torch.float32)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(single), "global_step": 1}, ckpt)  # the LDM layout
    with pytest.raises(BaseModelError, match="pass --allow-pickle"):
        load_pipeline(str(ckpt))
    assert_same_outputs(original, load_pipeline(str(ckpt), allow_pickle=True))
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.safetensors", "tiny.ckpt"]

    code = main(["generate", "--base", str(ckpt), "--prompt", "a red circle", "--steps", "2",
                 "--output", str(tmp_path / "out.png")])
    assert code == 2 and "--allow-pickle" in capsys.readouterr().err
    code = main(["generate", "--base", str(ckpt), "--allow-pickle", "--prompt", "a red circle",
                 "--steps", "2", "--output", str(tmp_path / "out.png")])
    assert code == 0 and (tmp_path / "out.png").is_file()
