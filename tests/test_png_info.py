"""PNG Info: A1111 `parameters` text back into settings, including <lora:...> tags."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sd_lora.adapters.use import AdapterUse
from sd_lora.generate.images import lora_tag
from sd_lora.generate.png_info import (
    ParsedParameters,
    PngInfoError,
    format_lora_tag,
    parse_lora_tag,
    parse_parameters,
    read_png_parameters,
)
from sd_lora.generate.render import RenderSettings, a1111_parameters, save_png


def _written(tmp_path: Path, prompt: str, choices: list[AdapterUse], **kwargs) -> Path:
    tags = " ".join(lora_tag(c) for c in choices)
    settings = RenderSettings(
        prompt=f"{prompt} {tags}".strip(), seed=1234, negative_prompt="blurry, text",
        steps=25, guidance_scale=6.5, width=64, height=96, sampler="DPM++ 2M Karras",
        extra={"Model": "tiny", "Lora hashes": '"style: 0123456789ab, detail: ba9876543210"'},
        **kwargs,
    )
    return save_png(Image.new("RGB", (8, 8)), tmp_path / "out.png", a1111_parameters(settings))


def test_round_trip_with_generate_lora_tags(tmp_path):
    choices = [
        AdapterUse(Path("style.safetensors"), 0.8, 0.8, name="style"),
        AdapterUse(Path("detail.safetensors"), unet=-0.3, text_encoder=0.5, name="detail"),
    ]
    parsed = read_png_parameters(_written(tmp_path, "zkstripes, a red circle", choices))
    assert parsed == ParsedParameters(
        prompt="zkstripes, a red circle",
        negative_prompt="blurry, text",
        steps=25,
        sampler="DPM++ 2M Karras",
        guidance=6.5,
        seed=1234,
        width=64,
        height=96,
        model="tiny",
        loras=[("style", 0.8, 0.8), ("detail", 0.5, -0.3)],  # (name, te, unet)
        extra={"Lora hashes": "style: 0123456789ab, detail: ba9876543210"},
    )


def test_multiline_prompts_and_tags_in_the_middle():
    text = (
        "a <lora:style:0.5> cat\non a mat <lora:b:1:0>\n"
        "Negative prompt: ugly\nsecond line\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, "
        "Size: 512x768, Model hash: abc, Model: v1-5"
    )
    parsed = parse_parameters(text)
    assert parsed.prompt == "a cat\non a mat"
    assert parsed.negative_prompt == "ugly\nsecond line"
    assert parsed.sampler == "DPM++ 2M Karras"  # A1111 1.6+ writes the schedule apart
    assert (parsed.width, parsed.height, parsed.model) == (512, 768, "v1-5")
    assert parsed.loras == [("style", 0.5, 0.5), ("b", 1.0, 0.0)]
    assert parsed.extra == {"Model hash": "abc"}


@pytest.mark.parametrize(
    "body, expected",
    [
        ("name", ("name", 1.0, 1.0, None)),
        ("name:0.7", ("name", 0.7, 0.7, None)),
        ("name:0.7:0.2", ("name", 0.7, 0.2, None)),
        ("name:unet=0.3", ("name", 1.0, 0.3, None)),
        ("name:te=0.4:unet=0.3", ("name", 0.4, 0.3, None)),
        ("sub/name:1:lbw=INS", ("sub/name", 1.0, 1.0, "INS")),
        ("name:1:lbw=1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1", ("name", 1.0, 1.0, "1" + ",0" * 15 + ",1")),
    ],
)
def test_lora_tag_forms(body, expected):
    assert parse_lora_tag(body) == expected


@pytest.mark.parametrize("te, unet", [(0.8, 0.8), (0.5, -0.3), (1.0, 1.0), (0.125, 2.0)])
def test_format_lora_tag_matches_generate_lora_tag(te, unet):
    choice = AdapterUse(Path("style.safetensors"), unet=unet, text_encoder=te, name="style")
    assert format_lora_tag("style", te, unet) == lora_tag(choice)
    assert parse_lora_tag(format_lora_tag("style", te, unet, "OUTD")[len("<lora:"):-1]) == (
        "style", te, unet, "OUTD")


def test_lbw_tags_are_kept_per_adapter():
    text = "x <lora:a:1:lbw=IND> <lora:b:0.5>\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64"
    parsed = parse_parameters(text)
    assert parsed.lora_blocks == {"a": "IND"}
    assert parsed.model is None


@pytest.mark.parametrize(
    "text, named",
    [
        ("", "empty"),
        ("just a prompt", "no Steps, Sampler, CFG scale, Seed, Size"),
        ("p\nSteps: x, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64", "Steps = 'x'"),
        ("p\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: big", "Size 'big'"),
        ("p <lora:a:1:dyn=3>\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64", "'dyn'"),
        ("p <lora::1>\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64", "no adapter name"),
    ],
)
def test_errors_name_the_field(text, named):
    with pytest.raises(PngInfoError, match=named):
        parse_parameters(text)


def test_read_errors_name_the_file(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    with pytest.raises(PngInfoError, match="plain.png: the image carries no 'parameters'"):
        read_png_parameters(plain)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png")
    with pytest.raises(PngInfoError, match="garbage.png: not a readable image"):
        read_png_parameters(garbage)
    with pytest.raises(PngInfoError, match="missing.png: no such image file"):
        read_png_parameters(tmp_path / "missing.png")
