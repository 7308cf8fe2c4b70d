"""Config loading: defaults, TOML, overrides, and errors that name the field."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from sd_lora.config import ConfigError, JobConfig, load_config, parse_override, to_toml


def test_defaults_are_valid():
    assert load_config() == JobConfig()


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[train]\nlearning_rate = 3e-4\nname = "ink"\n[lora]\nunet_r = 16\n')
    config = load_config(path, ["train.learning_rate=2e-4", 'lora.unet_targets=["attn", "ff"]'])
    assert config.train.learning_rate == 2e-4  # the override wins
    assert config.train.name == "ink"
    assert config.lora.unet_r == 16
    assert config.lora.unet_targets == ("attn", "ff")


def test_round_trip_through_toml(tmp_path):
    config = load_config(None, ["train.max_steps=7", "model.prediction_type=v_prediction",
                                'sample.prompts=["a \\"quoted\\" prompt"]', "sample.seeds=[3]"])
    path = tmp_path / "saved.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lerning_rate=1e-4", "unknown config key 'train.lerning_rate' (did you mean train.learning_rate?)"),
        ("trian.max_steps=3", "unknown config key 'trian'"),
        ('train.max_steps="ten"', "train.max_steps must be int, got str 'ten'"),
        ("train.max_steps=1.5", "train.max_steps must be int"),
        ("train.gradient_checkpointing=1", "train.gradient_checkpointing must be bool"),
        ("train.max_steps=-5", "train.max_steps = -5 must not be negative"),  # 0: the base's own
        ("train.learning_rate=3", "train.learning_rate = 3.0 must be between 0 and 1"),
        ("model.prediction_type=sample", "model.prediction_type = 'sample' is not allowed"),
        ("train.mixed_precision=fp8", "train.mixed_precision = 'fp8' is not allowed"),
        ("data.resolution=100", "data.resolution = 100 must be a multiple of 8"),
        ("sample.seeds=[1,2,3]", "sample.seeds has 3 entries"),
        ("train.name=a/b", "train.name = 'a/b' must be a plain file name"),
        ("lora.unet_targets=[1]", "lora.unet_targets[0] must be str"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nmax_steps = 3")
    with pytest.raises(ConfigError, match="broken.toml is not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_section_given_a_value_is_an_error(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("train = 3\n")
    with pytest.raises(ConfigError, match="train must be a table"):
        load_config(path)


def test_parse_override_values():
    assert parse_override("train.seed=3") == ("train.seed", 3)
    assert parse_override("train.name=demo") == ("train.name", "demo")  # bare words are strings
    assert parse_override("train.gradient_checkpointing=true") == ("train.gradient_checkpointing", True)
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        parse_override("train.seed")


@pytest.mark.parametrize("name", ["demo.toml", "sd15_style.toml"])
def test_example_configs_load(name):
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / name
    assert load_config(path).version == 1


def test_resume_refuses_changes_to_what_a_step_computes_and_allows_the_rest(tmp_path):
    from sd_lora.config import changes_refused_on_resume, flat_config
    from sd_lora.train.recommended import RECOMMENDED, with_recommended

    (tmp_path / "data").mkdir()
    # A run records (and a resumed run compares) its learning rates and steps as they ran:
    # the base's recommendation in place of the 0s.
    saved = flat_config(with_recommended(load_config(None, [f'data.path="{tmp_path / "data"}"'])))
    same = with_recommended(load_config(None, [
        f'data.path="{tmp_path / "data" / ".." / "data"}"',  # the same folder
        "train.max_steps=5000", "sample.every=7", 'export.dtype="fp32"', "report.enabled=false",
        "train.checkpoints_keep=5"]))
    assert changes_refused_on_resume(saved, same) == []
    changed = with_recommended(load_config(None, [
        f'data.path="{tmp_path}"', "train.learning_rate=3e-4", 'lora.unet_targets=["attn", "ff"]',
        "train.seed=1"]))
    refused = changes_refused_on_resume(saved, changed)
    assert len(refused) == 4, refused
    assert f"train.learning_rate: {RECOMMENDED['toy'].learning_rate!r} -> 0.0003" in refused
    assert "lora.unet_targets: ['attn'] -> ['attn', 'ff']" in refused
    assert any(r.startswith("data.path:") for r in refused)
    del saved["train.seed"]  # a field the checkpoint's version did not have yet
    assert len(changes_refused_on_resume(saved, changed)) == 3


def test_the_configuration_page_documents_every_option_as_config_py_does():
    """docs/configuration.md's option table is made from config.py (python -m
    sd_lora.cli.options_doc docs/configuration.md): every field, its type, default and comment;
    none without a description."""
    from pathlib import Path

    from sd_lora.cli.options_doc import table, with_table

    page = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    text = page.read_text(encoding="utf-8")
    assert with_table(text) == text, "run: python -m sd_lora.cli.options_doc docs/configuration.md"
    rows = [line for line in table().splitlines() if line.startswith("| `")]
    sections = typing.get_type_hints(JobConfig)
    assert len(rows) == sum(len(dataclasses.fields(sections[f.name]))
                            for f in dataclasses.fields(JobConfig) if f.name != "version")
    assert not [r for r in rows if r.endswith("|  |")], "a field without a comment in config.py"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.adam_epsilon=0"], "train.adam_epsilon = 0.0 must be positive"),
        (["train.adam_epsilon=-1e-8"], "train.adam_epsilon = -1e-08 must be positive"),
        (["train.adam_beta1=1"], "train.adam_beta1 = 1.0 must be in [0, 1)"),
        (["train.adam_beta2=-0.1"], "train.adam_beta2 = -0.1 must be in [0, 1)"),
        (['train.optimizer_args=["eps=0"]'], "train.optimizer_args eps=0 must be positive"),
        (['train.optimizer_args=["betas=(0.9, 1.0)"]'],
         "train.optimizer_args betas=(0.9, 1.0): each beta must be in [0, 1)"),
    ],
)
def test_adam_settings_that_make_a_nan_update_are_refused_naming_the_field(overrides, message):
    # With epsilon 0 a finite gradient gave NaN weights (0 / 0 where a gradient is 0).
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_adafactor_keeps_its_own_eps_pair():
    config = load_config(None, ["train.optimizer=adafactor", 'train.optimizer_args=["eps=(1e-30, 1e-3)"]'])
    assert config.train.optimizer_args == ("eps=(1e-30, 1e-3)",)
