"""Messages as a newcomer reads them: no terminal escape codes or Python object addresses, no
advice to pass a flag the command does not take, plan lines that add up."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sd_lora.adapters.files import save_adapter
from sd_lora.cli.main import build_parser, main
from sd_lora.util.pickles import ALLOW_FLAG, PickleRefused, load_tensors
from tests.test_formats import random_state

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"


class Smuggled:
    """A class the weights-only unpickler will not build (it is not a tensor)."""


def refusal_of(path: Path) -> str:
    with pytest.raises(PickleRefused) as refused:
        load_tensors(path)
    message = str(refused.value).removeprefix(f"{path}: ")
    assert "\x1b[" not in message  # torch's message sets text in bold
    assert "weights_only" not in message  # torch's advice to load it anyway, running its code
    return message


def test_the_weights_only_refusal_names_what_was_refused_without_escape_codes(tmp_path):
    saved = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": Smuggled()}}, saved)
    assert f"the Python object '{__name__}.Smuggled', which is not a tensor" in refusal_of(saved)
    plain = tmp_path / "plain.ckpt"  # pickled by Python itself, not torch.save
    with plain.open("wb") as handle:
        pickle.dump({"x": Smuggled()}, handle)
    assert "it cannot read the file (Unsupported operand" in refusal_of(plain)


def commands_that_advise_allow_pickle() -> list[str]:
    """Every command that reads a model or adapter file, and so may print the refusal."""
    return ["train", "generate", "inspect", "convert", "merge", "resize", "extract"]


@pytest.mark.parametrize("command", commands_that_advise_allow_pickle())
def test_every_command_that_may_print_the_advice_takes_allow_pickle(command):
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    flags = {s for action in subparsers.choices[command]._actions for s in action.option_strings}
    assert ALLOW_FLAG in flags


def test_convert_and_inspect_read_a_pickled_adapter_when_allowed(tmp_path, tiny_pipe, capsys):
    state = random_state(tiny_pipe)
    state.metadata = {"ss_base_model_version": "sd_v1"}
    good = save_adapter(state, tmp_path / "a.safetensors", dtype=torch.float32)
    pt = tmp_path / "a.pt"
    torch.save(safetensors.torch.load_file(good), pt)
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(pt), str(out), "--to", "kohya"]) == 2
    assert "pass --allow-pickle" in capsys.readouterr().err
    # Read now: a pickle carries no metadata, and the tiny model's widths name no family.
    assert main(["convert", str(pt), str(out), "--to", "kohya", "--allow-pickle"]) == 2
    assert "does not state its base family" in capsys.readouterr().err
    assert main(["inspect", str(pt), "--allow-pickle"]) == 0
    assert "format: kohya" in capsys.readouterr().out


def test_an_undecodable_image_is_explained_without_a_python_object(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DATA, data)
    (data / "notes.png").write_text("meeting notes, saved with the wrong extension")
    assert main(["check", str(data)]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "notes.png" in line)
    assert "object at 0x" not in line and "BytesIO" not in line
    assert "match no image format" in line


def test_the_plan_line_adds_regularization_up(tmp_path, capsys):
    data, reg = tmp_path / "data", tmp_path / "reg"
    data.mkdir()
    for image in sorted(SAMPLE_DATA.glob("*.png"))[:6]:
        shutil.copy(image, data / image.name)
        shutil.copy(image.with_suffix(".txt"), data / image.with_suffix(".txt").name)
    shutil.copytree(SAMPLE_DATA, reg)
    assert main(["check", str(data), "--set", f'data.regularization="{reg}"']) == 0
    out = capsys.readouterr().out
    assert ("6 images + 16 regularization images (12 items per epoch: 6 training, "
            "6 regularization)") in out


def test_an_unknown_lora_target_is_refused_with_the_config_not_after_loading(capsys):
    code = main(["check", str(SAMPLE_DATA), "--set", 'lora.unet_targets=["attn", "bogus"]'])
    assert code == 2
    assert ("lora.unet_targets = ['attn', 'bogus']: unknown group 'bogus'; choose from "
            "['attn', 'conv', 'ff', 'proj'] (UNet bases) or ['adaln', 'attn', 'ff'] (SD3's "
            "transformer)") in capsys.readouterr().err


def test_a_folder_given_as_an_adapter_is_called_a_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert f"{tmp_path} is a folder; name an adapter file in it" in capsys.readouterr().err


def test_the_app_refuses_a_pickled_base_without_advising_a_flag_it_lacks(tmp_path):
    from sd_lora.services.session import GenerateRequest, GenerationSession, RequestError
    from sd_lora.services.workspace import Workspace

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "old.ckpt").write_bytes(b"never opened")
    session = GenerationSession(Workspace.create(tmp_path / "adapters", models=tmp_path / "models"))
    with pytest.raises(RequestError, match="the app opens .safetensors only") as refused:
        session.generate(GenerateRequest(base="old.ckpt", prompt="x"))
    assert "--allow-pickle" not in str(refused.value)
