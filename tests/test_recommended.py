"""Learning rates and steps left at 0 (the defaults): the base's recommendation, printed in the
plan (sd_lora.train.recommended)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_lora.config import ConfigError, load_config
from sd_lora.train.preflight import check_job
from sd_lora.train.recommended import RECOMMENDED, plan_line, recommended_for, with_recommended

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"


def settings(*overrides: str) -> tuple[float, float, int]:
    train = with_recommended(load_config(None, list(overrides))).train
    return train.learning_rate, train.text_encoder_learning_rate, train.max_steps


@pytest.mark.parametrize("base, expected", [
    ("toy", (RECOMMENDED["toy"].learning_rate, RECOMMENDED["toy"].text_encoder_learning_rate,
             RECOMMENDED["toy"].max_steps)),
    ("tiny", (1e-4, 5e-5, 200)),  # what the tiny base always trained with: tests keep their figures
    ("tiny-sdxl", (1e-4, 5e-5, 200)),
    ("runwayml/stable-diffusion-v1-5", (1e-4, 5e-5, 1500)),  # any SD base: community values
    ("/models/sdxl.safetensors", (1e-4, 5e-5, 1500)),
])
def test_each_base_gets_its_recommendation(base, expected):
    assert settings(f'model.base="{base}"') == expected


def test_given_values_stay_and_prodigy_gets_its_multiplier():
    assert settings('model.base="toy"', "train.learning_rate=2e-3", "train.max_steps=7")[::2] == (2e-3, 7)
    prodigy = settings('model.base="toy"', 'train.optimizer="prodigy"')
    assert prodigy[:2] == (1.0, 1.0) and prodigy[2] == RECOMMENDED["toy"].max_steps
    assert recommended_for("sd15-folder").base == "Stable Diffusion bases"


def test_zero_is_accepted_and_negative_refused():
    assert load_config(None, []).train.learning_rate == 0  # the default: the recommendation
    with pytest.raises(ConfigError, match="train.learning_rate = -0.001 must be between"):
        load_config(None, ["train.learning_rate=-1e-3"])
    with pytest.raises(ConfigError, match="train.max_steps = -1 must not be negative"):
        load_config(None, ["train.max_steps=-1"])


def test_the_plan_says_where_the_values_come_from():
    toy = load_config(None, ['model.base="toy"', f'data.path="{SAMPLE_DATA}"'])
    rec = RECOMMENDED["toy"]
    line = plan_line(toy)
    assert line.startswith(f"learning rate {_text(rec.learning_rate)}, text encoder "
                           f"{_text(rec.text_encoder_learning_rate)}, {rec.max_steps} steps "
                           "(recommended for the toy base; set train.learning_rate, "
                           "train.text_encoder_learning_rate, train.max_steps to change)"), line
    mine = plan_line(load_config(None, ['model.base="tiny"', "train.learning_rate=1e-3",
                                        "lora.train_text_encoder=false"]))
    assert mine == ("200 steps (recommended for the tiny test base; set train.max_steps to "
                    "change), learning rate 1e-3 (train.learning_rate; recommended for the tiny "
                    "test base: 1e-4)"), mine
    check = check_job(toy)  # `sd-lora check` and `sd-lora train` print it in the plan
    assert check.plan()["steps"] == rec.max_steps and line in check.text()


def _text(rate: float) -> str:
    mantissa, exponent = f"{rate:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
