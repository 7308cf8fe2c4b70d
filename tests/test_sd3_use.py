"""Using SD3 adapter files: read without a model, inspected, applied (blended, at per-component
strengths) exactly as diffusers' own `load_lora_weights` applies them, refused on a base of
another family, and rendered by `sd-lora generate` and the app's session on `tiny-sd3`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sd_lora.adapters.apply import AdapterApplyError, apply_adapters, load_for, restore
from sd_lora.adapters.files import (
    adapter_from_tensors,
    detect_family,
    load_adapter,
    read_safetensors,
    reference_module_paths,
    save_adapter,
)
from sd_lora.adapters.inspect import format_inspection, inspect_adapter
from sd_lora.adapters.use import AdapterUse
from sd_lora.cli import main as cli
from sd_lora.formats.adapter_state import AdapterState, LoraModule
from sd_lora.generate.png_info import read_png_parameters
from sd_lora.lora.inject import add_lora, read_adapter_state
from sd_lora.models.builtin.tiny import build_tiny_pipeline
from sd_lora.models.load import load_pipeline
from sd_lora.models.schedulers import SamplerError, set_pipeline_sampler
from sd_lora.services.session import (
    FamilyMismatchError,
    GenerateRequest,
    GenerationSession,
    adapter_setting,
)
from sd_lora.services.workspace import Workspace
from tests.lora_helpers import fill_lora_B
from tests.test_sd3 import FP32_TOLERANCE, max_diff, sd3_outputs
from tests.test_workspace import make_adapter_file

LAYOUTS = ("kohya", "diffusers")
# Two adapters blended at different strengths per component: (unet = transformer, te).
STRENGTHS = {"a": (0.7, 0.3), "b": (-0.5, 1.2)}
PROMPT = "zkstripes, a red circle"


@pytest.fixture(autouse=True)
def two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def base():
    return load_pipeline("tiny-sd3")


def random_adapter(base, seed: int) -> AdapterState:
    """LoRA on the transformer's attention and feed-forward and on both CLIPs, lora_B random."""
    pipe = copy.deepcopy(base)
    models = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
              "text_encoder_2": pipe.text_encoder_2}
    add_lora(pipe.transformer, "transformer", ("attn", "ff"), 4, 2.0)
    add_lora(pipe.text_encoder, "text_encoder", ("attn", "mlp"), 4, 8.0)
    add_lora(pipe.text_encoder_2, "text_encoder_2", ("attn", "mlp"), 2, 1.0)
    fill_lora_B(models.values(), seed=seed)
    return read_adapter_state(models, "sd3")


@pytest.fixture(scope="module")
def files(base, tmp_path_factory) -> dict[tuple[str, str], object]:
    """{(adapter name, layout): path}: adapters a and b in both layouts, fp32."""
    folder = tmp_path_factory.mktemp("sd3-adapters")
    found = {}
    for seed, name in enumerate(STRENGTHS):
        state = random_adapter(base, seed)
        for layout in LAYOUTS:
            found[(name, layout)] = save_adapter(state, folder / f"{name}-{layout}.safetensors",
                                                 format=layout, dtype=torch.float32)
    return found


@pytest.fixture(scope="module")
def diffusers_blend(base, files) -> dict[str, torch.Tensor]:
    """The outputs of diffusers' StableDiffusion3Pipeline with both diffusers files loaded and
    blended through `set_adapters` at the per-component strengths."""
    pipe = copy.deepcopy(base)
    weights = []
    for name, (unet, te) in STRENGTHS.items():
        pipe.load_lora_weights(str(files[(name, "diffusers")]), adapter_name=name)
        weights.append({"transformer": unet, "text_encoder": te, "text_encoder_2": te})
    pipe.set_adapters(list(STRENGTHS), adapter_weights=weights)
    return sd3_outputs(pipe)


def test_both_layouts_read_without_a_model_as_the_same_adapter(files):
    kohya, diffusers = (load_adapter(files[("a", layout)]) for layout in LAYOUTS)
    assert kohya.family == diffusers.family == "sd3"
    assert set(kohya.modules) == {"transformer", "text_encoder", "text_encoder_2"}
    for component, modules in diffusers.modules.items():
        assert set(kohya.modules[component]) == set(modules), component
        for path, module in modules.items():  # the fused qkv split back: the same deltas
            torch.testing.assert_close(kohya.modules[component][path].delta(), module.delta())
    for layout in LAYOUTS:  # without metadata, the keys tell
        tensors, _ = read_safetensors(files[("a", layout)])
        assert detect_family(tensors, {}) == "sd3", layout


def test_an_sd35_large_file_resolves_too(tmp_path):
    """Large has 38 blocks and no attn2, Medium 24 with attn2 in blocks 0-12: both read."""
    paths = reference_module_paths("sd3")["transformer"]
    assert {"transformer_blocks.37.attn.to_q", "transformer_blocks.12.attn2.to_q"} <= set(paths)
    gen = torch.Generator().manual_seed(0)
    modules = {f"transformer_blocks.{block}.{attn}.to_{p}":
               LoraModule(torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen), 2.0)
               for block, attn in ((37, "attn"), (12, "attn2")) for p in "qkv"}
    state = AdapterState("sd3", {"transformer": modules})
    path = save_adapter(state, tmp_path / "large.safetensors", dtype=torch.float32)
    tensors, _ = read_safetensors(path)
    assert "lora_unet_joint_blocks_37_x_block_attn_qkv.lora_down.weight" in tensors
    back = adapter_from_tensors(tensors, {})  # no metadata: family from the names too
    assert set(back.modules["transformer"]) == set(modules) and not back.unmatched
    for name, module in modules.items():
        torch.testing.assert_close(back.modules["transformer"][name].delta(), module.delta())


def test_inspect_names_the_transformer(files):
    for layout in LAYOUTS:
        info = inspect_adapter(files[("a", layout)])
        assert info["family"] == "sd3" and not info["problems"], info["problems"]
        assert set(info["components"]) == {"transformer", "text_encoder", "text_encoder_2"}
        assert info["components"]["transformer"]["modules"] == 41
        assert "  transformer: 41 modules" in format_inspection(info)
        # which tools take which SD3 layout, by name (ComfyUI's reading of both: test_sd3.py)
        assert ("diffusers 0.42 reads none of it" in info["tools"][0]) == (layout == "kohya")
        assert ("ComfyUI reads it whole but at alpha = rank" in info["tools"][0]) == (layout != "kohya")
    tensors, metadata = read_safetensors(files[("a", "kohya")])
    unknown = {k.replace("joint_blocks_", "joint_blocks_9"): v for k, v in tensors.items()}
    path = files[("a", "kohya")].with_name("deeper.safetensors")
    save_file(unknown, str(path), metadata=metadata)  # blocks 90-92: described from the raw keys
    info = inspect_adapter(path)
    assert "match no sd3 module" in info["problems"][0]
    assert set(info["components"]) == {"transformer", "text_encoder", "text_encoder_2"}


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers' second adapter
@pytest.mark.parametrize("layout", LAYOUTS)
def test_blended_adapters_apply_as_diffusers_loads_them(base, files, diffusers_blend, layout):
    before = sd3_outputs(base)
    uses = [AdapterUse(load_adapter(files[(name, layout)]), unet, te, name=name)
            for name, (unet, te) in STRENGTHS.items()]
    applied = apply_adapters(base, uses)
    diff = max_diff(sd3_outputs(base), diffusers_blend)
    print(f"{layout}: ours vs diffusers' load_lora_weights + set_adapters: {diff:.1e}")
    assert diff < FP32_TOLERANCE
    assert "a: transformer x0.7, text x0.3" in applied.summary()
    restore(base, applied)
    assert max_diff(sd3_outputs(base), before) == 0.0  # the originals, bit for bit


def test_families_are_checked_both_ways(base, files, tmp_path):
    sd1_file = make_adapter_file(tmp_path / "sd1style.safetensors")
    tiny = build_tiny_pipeline()
    for layout in LAYOUTS:
        with pytest.raises(AdapterApplyError, match=r"a-\w+ was trained for 'sd3' but the pipeline "
                           r"is 'sd1' \(an SD 3.x adapter on an SD 1.x base\)"):
            load_for(tiny, files[("a", layout)], name=f"a-{layout}")
    with pytest.raises(AdapterApplyError, match="trained for 'sd1' but the pipeline is 'sd3' "
                       r"\(an SD 1.x adapter on an SD 3.x base\)"):
        load_for(base, sd1_file)
    with pytest.raises(AdapterApplyError, match="trained for 'sd3' but the pipeline is 'sd1'"):
        apply_adapters(tiny, [load_adapter(files[("a", "kohya")])])


def test_sd3_samplers_are_flow_matching_euler(base):
    pipe = copy.copy(base)  # the scheduler attribute is replaced, the models shared
    assert set_pipeline_sampler(pipe, "euler") == "Euler"
    assert not pipe.scheduler.config.stochastic_sampling and pipe.scheduler.config.shift == 3.0
    assert set_pipeline_sampler(pipe, "Euler a") == "Euler a"
    assert pipe.scheduler.config.stochastic_sampling
    with pytest.raises(SamplerError, match="'DDIM' is for the UNet.*choose one of"):
        set_pipeline_sampler(pipe, "ddim")


def test_generate_and_the_session_render_sd3_with_blended_adapters(files, tmp_path):
    space = Workspace.create(tmp_path / "adapters")
    for name in STRENGTHS:  # a kohya file and a diffusers one, blended
        layout = "kohya" if name == "a" else "diffusers"
        (space.adapters / f"{name}.safetensors").write_bytes(files[(name, layout)].read_bytes())
    make_adapter_file(space.adapters / "sd1style.safetensors")
    out = tmp_path / "cli.png"
    loras = [arg for name, (unet, te) in STRENGTHS.items()  # FILE:TE:UNET, A1111's order
             for arg in ("--lora", f"{space.adapters / name}.safetensors:{te}:{unet}")]
    assert cli.main(["generate", "--base", "tiny-sd3", "--prompt", PROMPT, "--seed", "3",
                     "--steps", "2", "--output", str(out), *loras]) == 0
    parsed = read_png_parameters(out)
    assert (parsed.sampler, parsed.model, parsed.width) == ("Euler a", "tiny-sd3", 64)
    assert parsed.loras == [("a", 0.3, 0.7), ("b", 1.2, -0.5)]

    session = GenerationSession(space)
    adapters = tuple(adapter_setting(name, unet, te) for name, (unet, te) in STRENGTHS.items())
    request = GenerateRequest(base="tiny-sd3", prompt=PROMPT, seed=3, steps=2, adapters=adapters)
    [blended] = session.generate(request)
    assert np.array_equal(np.asarray(blended.image), np.asarray(read_image(out)))  # the CLI's pixels
    [plain] = session.generate(GenerateRequest(base="tiny-sd3", prompt=PROMPT, seed=3, steps=2))
    assert np.abs(np.asarray(plain.image, int) - np.asarray(blended.image, int)).max() > 10
    with pytest.raises(FamilyMismatchError, match="'sd1style' was trained for sd1 but the base "
                       "'tiny-sd3' is sd3"):
        session.generate(GenerateRequest(base="tiny-sd3", prompt=PROMPT, seed=3, steps=2,
                                         adapters=(adapter_setting("sd1style"),)))


def read_image(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")
