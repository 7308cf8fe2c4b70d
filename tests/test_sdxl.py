"""SDXL: two text encoders, size conditioning, training, and the kohya layout sd-scripts writes.

The tiny SDXL pipeline (`tiny-sdxl`) has SDXL base's block layout, so its module names, LDM names
and LoRA keys are those of a real SDXL model; the full-size key set is checked on SDXL base's
published configs (bundled in sd_lora/assets/configs), built on the meta device.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_lora.adapters.apply import apply_adapters
from sd_lora.adapters.files import load_adapter, pipeline_module_paths, save_adapter
from sd_lora.config import load_config
from sd_lora.data import ImageCaptionDataset, Sample
from sd_lora.formats import ldm_checkpoint as ldm
from sd_lora.formats.adapter_state import AdapterState, LoraModule, canonical_name
from sd_lora.formats.kohya import LDM_UNET_LAYOUTS, to_kohya
from sd_lora.formats.peft_diffusers import modern_key
from sd_lora.lora.inject import (
    add_lora,
    read_adapter_state,
    target_module_names,
    target_suffixes,
)
from sd_lora.models.families import model_family
from sd_lora.models.load import load_pipeline
from sd_lora.models.single_file import bundled_folder
from sd_lora.models.text import (
    default_time_ids,
    encode_all,
    text_encoders_of,
    tokenize_all,
    tokenizers_of,
)
from sd_lora.train.recipe import train
from tests.lora_helpers import fill_lora_B, train_keeping_loop

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FP32_TOLERANCE = 1e-5


@torch.no_grad()
def sdxl_outputs(pipe, time_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Both encoders' conditioning and the UNet's prediction for fixed prompts and latents."""
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    ids = tokenize_all(tokenizers_of(pipe), ["zkstripes, a red circle", "two blue squares"])
    time_ids = default_time_ids(2, 64, 64) if time_ids is None else time_ids
    cond = encode_all(text_encoders_of(pipe), ids, time_ids)
    noise = pipe.unet(latents, torch.tensor([10, 700]), **cond.unet_kwargs()).sample
    return {"hidden": cond.hidden_states, "pooled": cond.pooled, "unet": noise}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def adapted():
    """tiny-sdxl with LoRA on every target group of all three models, B random and nonzero."""
    pipe = load_pipeline("tiny-sdxl")
    base = sdxl_outputs(pipe)
    add_lora(pipe.unet, "unet", ("attn", "proj", "ff"), 4, 8)
    for name in ("text_encoder", "text_encoder_2"):
        add_lora(getattr(pipe, name), name, ("attn", "mlp"), 4, 2)
    fill_lora_B([getattr(pipe, c) for c in COMPONENTS], seed=1, scale=0.1)
    state = read_adapter_state({c: getattr(pipe, c) for c in COMPONENTS}, model_family(pipe))
    return state, sdxl_outputs(pipe), base


def test_size_conditioning_and_the_pooled_embedding_reach_the_unet():
    pipe = load_pipeline("tiny-sdxl")
    plain = sdxl_outputs(pipe)
    cropped = sdxl_outputs(pipe, torch.tensor([[128.0, 96, 16, 0, 64, 64]] * 2))
    assert plain["hidden"].shape == (2, 77, 80) and plain["pooled"].shape == (2, 48)
    assert float((plain["unet"] - cropped["unet"]).abs().max()) > 1e-4  # time_ids are used


def test_dataset_gives_each_item_its_size_and_crop(tmp_path):
    """time_ids = (original h, original w, crop top, crop left, target h, target w): a 96x64
    (w x h) image resized to 64 px high is 96 wide, so a crop has 32 px of slack on the left."""
    Image.new("RGB", (96, 64), (200, 30, 30)).save(tmp_path / "wide.png")
    Image.new("RGB", (40, 80), (30, 30, 200)).save(tmp_path / "tall.png")
    samples = [Sample(image=tmp_path / name, caption="x") for name in ("wide.png", "tall.png")]
    centred = ImageCaptionDataset(samples, 64)
    assert centred[0]["time_ids"].tolist() == [64, 96, 0, 16, 64, 64]
    assert centred[1]["time_ids"].tolist() == [80, 40, 32, 0, 64, 64]  # 40x80 -> 64x128
    lefts = set()
    for seed in range(8):  # a random crop reports where it cut
        time_ids = ImageCaptionDataset(samples, 64, center_crop=False, seed=seed)[0]["time_ids"]
        assert time_ids[2] == 0 and 0 <= time_ids[3] <= 32
        lefts.add(int(time_ids[3]))
    assert len(lefts) > 1


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_loads_our_sdxl_file_like_the_model_that_made_it(tmp_path, adapted, fmt):
    state, reference, base = adapted
    assert max_diff(reference, base) > 1e-2  # the adapter changes all three outputs
    path = save_adapter(state, tmp_path / f"{fmt}.safetensors", format=fmt, dtype=torch.float32)
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    if fmt == "kohya":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2.alpha" in keys
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
        assert "lora_te2_text_model_encoder_layers_2_mlp_fc2.lora_up.weight" in keys
        assert not any("down_blocks" in k for k in keys)
    assert metadata is None or "lora_adapter_metadata" in metadata or fmt == "kohya"
    theirs = load_pipeline("tiny-sdxl")
    theirs.load_lora_weights(str(path))
    for component in COMPONENTS:
        wrapped = sum(isinstance(m, BaseTunerLayer) for m in getattr(theirs, component).modules())
        assert wrapped == len(state.modules[component]), (fmt, component, "layers skipped")
    diff = max_diff(sdxl_outputs(theirs), reference)
    print(f"{fmt}: diffusers' StableDiffusionXLPipeline vs the trained model {diff:.1e}")
    assert diff < FP32_TOLERANCE


def test_our_reader_and_apply_match_on_sdxl(tmp_path, adapted):
    state, reference, _ = adapted
    path = save_adapter(state, tmp_path / "k.safetensors", format="kohya", dtype=torch.float32)
    pipe = load_pipeline("tiny-sdxl")
    for paths in (pipeline_module_paths(pipe), None):  # against the model, and model-free
        back = load_adapter(path, paths)
        assert back.family == "sdxl" and not back.unmatched
        for component, modules in state.modules.items():
            assert back.modules[component].keys() == modules.keys()
            for p, m in modules.items():
                assert torch.equal(back.modules[component][p].lora_B, m.lora_B)
                assert back.modules[component][p].alpha == m.alpha
    apply_adapters(pipe, [(load_adapter(path, pipeline_module_paths(pipe)), 1.0, 1.0)])
    assert max_diff(sdxl_outputs(pipe), reference) < FP32_TOLERANCE


def test_sdxl_kohya_file_with_diffusers_unet_names_is_read(adapted):
    """Some SDXL files (older trainers, diffusers' own converter) spell the UNet with diffusers
    paths (`lora_unet_down_blocks_1_...`); they resolve to the same modules."""
    state, _, _ = adapted
    tensors = {}
    for component, modules in state.modules.items():
        prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[component]
        for p, m in modules.items():
            name = f"{prefix}_{canonical_name(component, p).replace('.', '_')}"
            tensors[f"{name}.lora_down.weight"] = m.lora_A
            tensors[f"{name}.lora_up.weight"] = m.lora_B
            tensors[f"{name}.alpha"] = torch.tensor(m.alpha)
    from sd_lora.adapters.files import adapter_from_tensors

    back = adapter_from_tensors(tensors, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert {c: m.keys() for c, m in back.modules.items()} == {c: m.keys() for c, m in state.modules.items()}


def test_sd15_adapter_on_sdxl_is_refused_with_the_likely_cause(tmp_path):
    from sd_lora.adapters.files import AdapterFileError
    from sd_lora.models.builtin.tiny import build_tiny_pipeline

    sd1 = build_tiny_pipeline()
    add_lora(sd1.unet, "unet", ("attn",), 2, 2)
    path = save_adapter(read_adapter_state({"unet": sd1.unet}, "sd1"), tmp_path / "sd1.safetensors")
    with pytest.raises(AdapterFileError, match="match no sdxl module"):
        load_adapter(path, pipeline_module_paths(load_pipeline("tiny-sdxl")), family="sdxl")


# --- the full-size SDXL layout -----------------------------------------------------------------


def full_size_sdxl():
    folder = bundled_folder("stable-diffusion-xl-base-1.0")

    def read(rel: str) -> dict:
        return json.loads((folder / rel).read_text())

    with torch.device("meta"):
        return (UNet2DConditionModel.from_config(read("unet/config.json")),
                CLIPTextModel(CLIPTextConfig.from_dict(read("text_encoder/config.json"))),
                CLIPTextModelWithProjection(CLIPTextConfig.from_dict(read("text_encoder_2/config.json"))))


def test_full_size_sdxl_kohya_layout():
    """SDXL base's UNet, CLIP-L and OpenCLIP-bigG at rank 1, every target group. Reference:
    diffusers' maintained SDXL LoRA reader (`StableDiffusionXLPipeline.lora_state_dict` with the
    UNet config, which maps sd-scripts' LDM names back to diffusers paths) must turn our file
    into exactly the modules we adapted, with the same shapes; the counts are those of
    sd-scripts' SDXL LoRA files (722 UNet, 72 + 192 text-encoder modules)."""
    unet, te1, te2 = full_size_sdxl()
    modules: dict = {}
    for component, model, groups in (("unet", unet, ("attn", "proj", "ff")),
                                      ("text_encoder", te1, ("attn", "mlp")),
                                      ("text_encoder_2", te2, ("attn", "mlp"))):
        for name in target_module_names(model, target_suffixes(component, groups)):
            weight = model.get_submodule(name).weight
            modules.setdefault(component, {})[canonical_name(component, name)] = LoraModule(
                torch.zeros(1, weight.shape[1]), torch.zeros(weight.shape[0], 1), 1.0)
    # 70 transformer blocks x (attn1 4 + attn2 4 + ff 2) + 11 x proj_in/out; 12 and 32 layers x 6
    assert {c: len(m) for c, m in modules.items()} == {
        "unet": 722, "text_encoder": 72, "text_encoder_2": 192}
    ours = to_kohya(AdapterState("sdxl", modules), torch.float32)
    unet_names = {k.split(".")[0] for k in ours if k.startswith("lora_unet_")}
    blocks = {re.match(r"lora_unet_((?:input|output)_blocks_\d+_\d+|middle_block_\d+)_", n)[1]
              for n in unet_names}
    assert blocks == {"input_blocks_4_1", "input_blocks_5_1", "input_blocks_7_1",
                      "input_blocks_8_1", "middle_block_1", "output_blocks_0_1",
                      "output_blocks_1_1", "output_blocks_2_1", "output_blocks_3_1",
                      "output_blocks_4_1", "output_blocks_5_1"}
    assert ours["lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k.lora_down.weight"].shape == (1, 2048)
    assert ours["lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_0_proj.lora_up.weight"].shape == (10240, 1)
    assert ours["lora_te2_text_model_encoder_layers_31_mlp_fc1.lora_up.weight"].shape == (5120, 1)

    converted, _ = StableDiffusionXLPipeline.lora_state_dict(dict(ours), unet_config=unet.config)
    theirs: dict[tuple[str, str], dict[str, tuple]] = {}
    te_renames = {"self_attn.to_q.": "self_attn.q_proj.", "self_attn.to_k.": "self_attn.k_proj.",
                  "self_attn.to_v.": "self_attn.v_proj.", "self_attn.to_out.0.": "self_attn.out_proj."}
    for key, value in converted.items():
        key = modern_key(key)
        component, rest = key.split(".", 1)
        if component != "unet":
            for old, new in te_renames.items():
                rest = rest.replace(old, new)
        path, part = rest.rsplit(".", 2)[0], rest.rsplit(".", 2)[1]
        theirs.setdefault((component, path), {})[part] = tuple(value.shape)
    want = {(c, p): {"lora_A": tuple(m.lora_A.shape), "lora_B": tuple(m.lora_B.shape)}
            for c, mods in modules.items() for p, m in mods.items()}
    assert theirs == want


def test_ldm_unet_table_round_trips_every_sdxl_module():
    """The diffusers -> LDM module table, both ways, on every parameter of SDXL base's UNet."""
    unet, _, _ = full_size_sdxl()
    table = ldm.unet_module_table(unet.config)
    assert ldm.unet_module_table(LDM_UNET_LAYOUTS["sdxl"]) == table  # the layout is all it needs
    inverse = ldm.invert(table)
    converted = ldm.unet_to_ldm(unet.state_dict(), unet.config)
    assert len(converted) == len(unet.state_dict())
    for key in unet.state_dict():
        module, _, _ = key.rpartition(".")
        assert ldm.map_module_name(ldm.map_module_name(module, table), inverse) == module
    assert "model.diffusion_model.label_emb.0.0.weight" in converted
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight" in converted
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in converted  # the upsampler


# --- training ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_sdxl_trains_both_encoders_and_its_export_loads_in_diffusers(tmp_path):
    config = load_config(None, [
        'model.base="tiny-sdxl"', f'data.path="{SAMPLE_DATA}"', f'train.output_dir="{tmp_path}"',
        "train.name=xl", "train.max_steps=4", "train.batch_size=2", "train.checkpoint_every=0",
        "sample.steps=2", "sample.every=0", 'export.formats=["kohya", "diffusers"]',
        'export.dtype="fp32"', "train.learning_rate=1e-2", "train.text_encoder_learning_rate=1e-2",
        "train.text_encoder_2_learning_rate=2e-2", "report.enabled=false",
    ])
    result, loop = train_keeping_loop(config)
    assert [g["lr"] for g in loop.trainee.optimizer.param_groups] == [1e-2, 1e-2, 2e-2]  # unet, text_encoder, text_encoder_2
    want = sdxl_outputs(loop.trainee.pipe)
    assert max_diff(want, sdxl_outputs(load_pipeline("tiny-sdxl"))) > 1e-3  # it learned something
    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:
        metadata = f.metadata()
        assert any(k.startswith("lora_te2_") for k in f.keys())
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    for fmt in ("kohya", "diffusers"):
        fresh = load_pipeline("tiny-sdxl")
        fresh.load_lora_weights(str(result.adapter_files[fmt]))
        assert max_diff(sdxl_outputs(fresh), want) < FP32_TOLERANCE, fmt


# --- single-file SDXL checkpoints ----------------------------------------------------------------


def test_sdxl_single_file_round_trip_and_diffusers_reads_it(tmp_path):
    """tiny-sdxl written as one LDM checkpoint loads back (our loader, and diffusers' own
    from_single_file with the file's configs) with every weight bit-identical."""
    from sd_lora.models.single_file import (
        _write_folder,
        bundled_configs,
        metadata_configs,
        save_single_file,
    )
    from sd_lora.models.single_file_header import read_header
    from sd_lora.models.tokenizers import clip_tokenizer, open_clip_tokenizer

    original = load_pipeline("tiny-sdxl")
    path = save_single_file(original, tmp_path / "xl.safetensors", torch.float32)
    header = read_header(path)
    assert header.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    projection = original.text_encoder_2.text_projection.weight
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("conditioner.embedders.1.model.text_projection"), projection.T)
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in f.keys()
    ours = load_pipeline(str(path))
    configs = metadata_configs(header, bundled_configs("stable-diffusion-xl-base-1.0"))
    folder = _write_folder(configs, tmp_path / "configs")
    theirs = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), tokenizer=clip_tokenizer(), tokenizer_2=open_clip_tokenizer(),
        local_files_only=True, add_watermarker=False)
    for loaded in (ours, theirs):
        assert isinstance(loaded, StableDiffusionXLPipeline)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            want, got = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
            assert want.keys() == got.keys(), name
            assert all(torch.equal(v, got[k]) for k, v in want.items()), name
    assert max_diff(sdxl_outputs(ours), sdxl_outputs(original)) < FP32_TOLERANCE


def test_full_size_sdxl_checkpoint_layout_is_what_diffusers_reads():
    """SDXL base's four models (meta device) in our LDM layout: diffusers' single-file
    converters (the ones `from_single_file` runs) turn every one back into exactly the model's
    own parameter names and shapes. 2514 tensors: SDXL base files have one more, CLIP-L's
    position_ids buffer, which no loader needs."""
    from diffusers.loaders import single_file_utils as diffusers_ldm

    from sd_lora.models.single_file import bundled_configs

    configs = bundled_configs("stable-diffusion-xl-base-1.0")
    unet, te1, te2 = full_size_sdxl()
    with torch.device("meta"):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_config(configs.vae)
    ckpt = ldm.components_to_ldm(unet, vae, te1, "sdxl", te2)
    assert len(ckpt) == 2514
    assert tuple(ckpt["conditioner.embedders.1.model.text_projection"].shape) == (1280, 1280)
    assert tuple(ckpt["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape) == (3840, 1280)
    assert tuple(ckpt["model.diffusion_model.label_emb.0.0.weight"].shape) == (1280, 2816)
    converted = {
        "unet": (unet, diffusers_ldm.convert_ldm_unet_checkpoint(ckpt, configs.unet)),
        "vae": (vae, diffusers_ldm.convert_ldm_vae_checkpoint(ckpt, configs.vae)),
        "text_encoder": (te1, {k.removeprefix("text_model."): v for k, v in
                               diffusers_ldm.convert_ldm_clip_checkpoint(ckpt, ldm.SDXL_CLIP_PREFIX).items()}),
        "text_encoder_2": (te2, diffusers_ldm.convert_open_clip_checkpoint(te2, ckpt, ldm.SDXL_OPEN_CLIP_PREFIX)),
    }
    for name, (model, theirs) in converted.items():
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in theirs.items()} == want, name


def test_merge_into_an_sdxl_base_writes_a_checkpoint_that_loads(tmp_path, adapted):
    from sd_lora.cli.main import main

    state, reference, _ = adapted
    adapter = save_adapter(state, tmp_path / "a.safetensors", dtype=torch.float32)
    out = tmp_path / "baked.safetensors"
    assert main(["merge", str(adapter), "--into", "tiny-sdxl", "--out", str(out), "--dtype", "fp32"]) == 0
    baked = load_pipeline(str(out))
    assert max_diff(sdxl_outputs(baked), reference) < 1e-4  # merged W + dW rounds differently


def test_sdxl_convert_is_lossless_both_ways(tmp_path, adapted):
    """kohya (LDM names) -> diffusers -> kohya gives back the same file tensors, bit for bit."""
    from safetensors.torch import load_file

    from sd_lora.cli.main import main

    state, _, _ = adapted
    kohya = save_adapter(state, tmp_path / "k.safetensors", dtype=torch.float32)
    diffusers, again = tmp_path / "d.safetensors", tmp_path / "k2.safetensors"
    assert main(["convert", str(kohya), str(diffusers), "--to", "diffusers", "--dtype", "fp32"]) == 0
    assert main(["convert", str(diffusers), str(again), "--to", "kohya", "--dtype", "fp32"]) == 0
    first, second = load_file(kohya), load_file(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(k.startswith("text_encoder_2.") for k in load_file(diffusers))


def test_the_app_session_generates_with_an_sdxl_adapter_and_refuses_an_sd1_one(tmp_path, adapted):
    """The browser app's session on an SDXL base: an SDXL adapter changes the image (the
    first UNet strength 0 gives the base's own pixels); an SD 1.x adapter is refused by name."""
    import numpy as np

    from sd_lora.services.session import GenerateRequest, GenerationSession, adapter_setting
    from sd_lora.services.workspace import Workspace
    from tests.test_workspace import make_adapter_file

    state, _, _ = adapted
    space = Workspace.create(tmp_path / "adapters")
    save_adapter(state, space.adapters / "xl.safetensors")
    make_adapter_file(space.adapters / "sd1.safetensors", seed=1)
    session = GenerationSession(space)

    def render(*adapters):
        result = session.generate(GenerateRequest(base="tiny-sdxl", prompt="a red circle", seed=3,
                                                  steps=4, adapters=adapters))[0]
        return np.asarray(result.image.convert("RGB"))

    base = render()
    assert session.base_family == "sdxl"
    assert not np.array_equal(render(adapter_setting("xl", 1.0, 1.0)), base)
    assert np.array_equal(render(adapter_setting("xl", 0.0, 0.0)), base)
    with pytest.raises(Exception, match="sd1.*sdxl|SD 1.*SDXL"):
        render(adapter_setting("sd1", 1.0, 1.0))


@pytest.mark.slow
def test_sdxl_with_buckets_and_both_caches_trains_as_without_caches(tmp_path, monkeypatch):
    """SDXL's conditioning from cached captions (pooled embedding included) and cached bucketed
    latents: the same run as without the caches, bit for bit (one image per VAE call)."""
    from safetensors.torch import load_file

    from sd_lora.data import latent_cache

    monkeypatch.setattr(latent_cache, "FILL_BATCH", 1)
    folder = tmp_path / "data"
    folder.mkdir()
    for i, size in enumerate([(96, 64), (96, 64), (64, 96), (64, 64)]):
        Image.new("RGB", size, (60 * i, 90, 200 - 40 * i)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zkstyle, shape {i % 2}")

    def run(name, *extra):
        config = load_config(None, [
            'model.base="tiny-sdxl"', f'data.path="{folder}"', f'train.output_dir="{tmp_path / name}"',
            "train.name=xl", "train.max_steps=4", "train.batch_size=1", "train.checkpoint_every=0",
            "sample.steps=2", "sample.every=0", 'export.dtype="fp32"', "report.enabled=false",
            "lora.train_text_encoder=false", "data.enable_bucket=true", "data.bucket_reso_steps=8",
            "data.random_flip=true", "train.learning_rate=1e-2", *extra,
        ])
        return load_file(train(config, show_progress=False).adapter_files["kohya"])

    plain = run("plain")
    cached = run("cached", 'data.cache_latents="memory"', "data.cache_text_encoder_outputs=true")
    assert plain.keys() == cached.keys()
    assert max(float((plain[k] - cached[k]).abs().max()) for k in plain) == 0.0
