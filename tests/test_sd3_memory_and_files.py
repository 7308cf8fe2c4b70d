"""SD3 / SD3.5 single-file checkpoints (original layout: `model.diffusion_model.joint_blocks...`,
`first_stage_model.`, `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`) loaded offline, checked
against the pipeline that wrote them and against diffusers' own single-file converters; and the
pre-flight memory estimate of SD3 bases, counted without loading weights."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders import single_file_utils as theirs
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd_lora.config import load_config
from sd_lora.formats import sd3_checkpoint as sd3
from sd_lora.models.bases import BaseModelError
from sd_lora.models.load import load_pipeline
from sd_lora.models.single_file import bundled_folder, save_single_file
from sd_lora.models.single_file_header import Header, read_header
from sd_lora.models.single_file_sd3 import (
    build_on_meta,
    bundled_sd3,
    choose_config,
    sd3_tensors,
)
from sd_lora.models.tokenizers import clip_tokenizer, open_clip_tokenizer, tiny_t5_tokenizer
from sd_lora.train import memory
from tests.test_sd3 import max_diff, sd3_outputs

MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    """No T5 tokenizer from a real cache: each test says where one is, if anywhere."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.fixture(scope="module")
def tiny():
    """tiny-sd3 with CLIP-L's projection an identity, as SD3's is: the original layout has no
    CLIP-L projection (SD3 reads its pooled output unprojected; see formats.sd3_checkpoint)."""
    pipe = load_pipeline("tiny-sd3")  # frozen, in eval mode (no dropout in T5)
    projection = pipe.text_encoder.text_projection.weight
    projection.data = torch.eye(*projection.shape)
    return pipe


def assert_same_weights(a, b, names=MODELS):
    for name in names:
        want, got = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(v, got[k]) for k, v in want.items()), name


@torch.no_grad()
def vae_round_trip(pipe) -> torch.Tensor:
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return pipe.vae.decode(pipe.vae.encode(image).latent_dist.mean).sample


def t5_tokenizer_beside(path):
    tiny_t5_tokenizer().save_pretrained(str(path.parent / "tokenizer_3"))


def test_an_incl_clips_t5_file_loads_back_exactly_and_diffusers_reads_it(tmp_path, tiny):
    path = save_single_file(tiny, tmp_path / "sd3.5_tiny_incl_clips_t5.safetensors", torch.float32)
    header = read_header(path)
    assert header.metadata["modelspec.architecture"] == "stable-diffusion-3-5-medium"
    assert "modelspec.prediction_type" not in header.metadata  # rectified flow has no name there
    assert {"model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight",
            "text_encoders.clip_g.transformer.text_projection.weight",
            "text_encoders.t5xxl.transformer.shared.weight"} <= header.shapes.keys()
    assert sd3.CLIP_L_PROJECTION not in header.shapes
    t5_tokenizer_beside(path)  # the hub repos' layout: tokenizer_3/ beside the single file
    ours = load_pipeline(str(path))
    assert isinstance(ours, StableDiffusion3Pipeline) and ours.text_encoder_3 is not None
    assert_same_weights(tiny, ours)
    assert max_diff(sd3_outputs(ours), sd3_outputs(tiny)) == 0
    assert torch.equal(vae_round_trip(ours), vae_round_trip(tiny))
    # diffusers' from_single_file, given the stored configs, reads the same weights
    folder = tmp_path / "configs"
    index = json.loads((bundled_folder("stable-diffusion-3.5-medium") / "model_index.json").read_text())
    for name, config in header.configs_metadata().items():
        file = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        file.parent.mkdir(parents=True)
        file.write_text(json.dumps(config, default=list))
    (folder / "model_index.json").write_text(json.dumps(index))
    reference = StableDiffusion3Pipeline.from_single_file(
        str(path), config=str(folder), tokenizer=clip_tokenizer(), tokenizer_2=open_clip_tokenizer(),
        tokenizer_3=tiny_t5_tokenizer(), local_files_only=True)
    # diffusers 0.42 + transformers 5 leave T5's second embedding name on meta: tie it
    reference.text_encoder_3.tie_weights()
    assert_same_weights(tiny, reference)


def test_without_a_t5_tokenizer_t5_is_left_out_with_a_one_line_note(tmp_path, tiny, caplog):
    path = save_single_file(tiny, tmp_path / "incl_t5.safetensors", torch.float32)
    with caplog.at_level(logging.WARNING):
        pipe = load_pipeline(str(path))
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    notes = [r.getMessage() for r in caplog.records if "T5" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "tokenizer" in notes[0] and "CLIP-L and CLIP-G only" in notes[0]
    assert_same_weights(tiny, pipe, ("transformer", "vae", "text_encoder", "text_encoder_2"))
    # the CLIP part of the conditioning is the original's; T5's part is zeros (as NoT5 gives)
    got, want = sd3_outputs(pipe), sd3_outputs(tiny)
    clips = tiny.text_encoder.config.hidden_size + tiny.text_encoder_2.config.hidden_size
    assert torch.equal(got["hidden"][:, :77, :clips], want["hidden"][:, :77, :clips])
    assert not got["hidden"][:, 77:].any() and torch.equal(got["pooled"], want["pooled"])
    # load_t5 = false: not read, and no note
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert load_pipeline(str(path), load_t5=False).text_encoder_3 is None
    assert not [r for r in caplog.records if "T5" in r.getMessage()]


def test_a_file_without_text_encoders_is_refused_with_what_to_pass(tmp_path, tiny):
    path = save_single_file(tiny, tmp_path / "sd3.5_medium.safetensors", torch.float32,
                            text_encoders=False)
    assert not any(k.startswith("text_encoders.") for k in read_header(path).shapes)
    with pytest.raises(BaseModelError) as refused:
        load_pipeline(str(path))
    message = str(refused.value)
    assert "CLIP-L" in message and "CLIP-G" in message and "incl_clips" in message
    assert "stabilityai/stable-diffusion-3.5-medium" in message
    tiny.save_config(str(tmp_path))  # beside a diffusers SD3 folder's model_index.json
    with pytest.raises(BaseModelError, match="pass that folder"):
        load_pipeline(str(path))


def test_an_fp8_t5_is_read_and_cast_up_and_fp8_scaled_files_are_refused(tmp_path, tiny):
    tensors = {k: v.contiguous() for k, v in sd3_tensors(tiny).items()}
    t5 = sd3.TEXT_PREFIXES["text_encoder_3"]
    fp8 = {k: v.to(torch.float8_e4m3fn) if k.startswith(t5) and v.is_floating_point() else v
           for k, v in tensors.items()}  # the "t5xxlfp8" variants
    path = tmp_path / "incl_clips_t5xxlfp8.safetensors"
    save_file(fp8, str(path), metadata=read_header(save_single_file(
        tiny, tmp_path / "with-configs.safetensors", torch.float32)).metadata)
    t5_tokenizer_beside(path)
    pipe = load_pipeline(str(path))
    got = pipe.text_encoder_3.state_dict()
    for key, value in tiny.text_encoder_3.state_dict().items():
        assert torch.equal(got[key], value.to(torch.float8_e4m3fn).float()), key
    scaled = dict(tensors, scaled_fp8=torch.zeros(2))
    save_file(scaled, str(tmp_path / "scaled.safetensors"))
    with pytest.raises(BaseModelError, match="fp8-scaled"):
        load_pipeline(str(tmp_path / "scaled.safetensors"))
    bare = {k.removeprefix(sd3.TRANSFORMER_PREFIX): v for k, v in tensors.items()
            if k.startswith(sd3.TRANSFORMER_PREFIX)}  # a transformer alone (ComfyUI's unet folder)
    save_file(bare, str(tmp_path / "bare.safetensors"))
    with pytest.raises(BaseModelError, match="SD3 transformer alone"):
        load_pipeline(str(tmp_path / "bare.safetensors"))


def small_conventional_sd3():
    """An SD3.5-Medium-like pipeline with the bundled configs' conventions (64-channel heads,
    32 GroupNorm groups, the real activations), shrunk: a file of it without stored configs
    loads from shapes alone."""
    bundled = bundled_sd3("5-medium")
    fields = {
        "transformer": dict(num_layers=2, num_attention_heads=2, joint_attention_dim=64,
                            caption_projection_dim=128, pooled_projection_dim=128,
                            pos_embed_max_size=16, dual_attention_layers=[0]),
        "vae": dict(block_out_channels=[32, 32], layers_per_block=1,
                    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
        "text_encoder": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=1, projection_dim=64),
        "text_encoder_2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=1, projection_dim=64),
        "text_encoder_3": dict(vocab_size=100, d_model=64, d_kv=64, num_heads=1, d_ff=128, num_layers=1),
    }
    torch.manual_seed(3)
    configs = {name: dict(bundled[name], **changes) for name, changes in fields.items()}
    models = {"transformer": SD3Transformer2DModel.from_config(configs["transformer"]),
              "vae": AutoencoderKL.from_config(configs["vae"]),
              "text_encoder_3": T5EncoderModel(T5Config.from_dict(configs["text_encoder_3"]))}
    for name in ("text_encoder", "text_encoder_2"):
        models[name] = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs[name]))
    return {name: model.eval() for name, model in models.items()}


def test_a_file_without_stored_configs_takes_its_shapes_from_the_tensors(tmp_path):
    models = small_conventional_sd3()
    encoders = {name: models[name] for name in MODELS[2:]}
    tensors = sd3.components_to_original(models["transformer"], models["vae"], encoders)
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))  # no metadata
    header = read_header(path)
    for name in MODELS:
        config, source = choose_config(header, name, bundled_sd3("5-medium"))
        assert source == "a config inferred from the shapes", name
    t5_tokenizer_beside(path)
    pipe = load_pipeline(str(path))
    models["text_encoder"].text_projection.weight.data = torch.eye(64)
    for name, model in models.items():
        want, got = model.state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(v, got[k]) for k, v in want.items()), name
    assert list(pipe.transformer.config.dual_attention_layers) == [0]


@pytest.fixture(scope="module")
def full_size():
    """SD 3.5 Medium's and Large's models from the bundled configs, on the meta device."""
    with torch.device("meta"):
        return {variant: {name: build_on_meta(name, config) for name, config in
                          bundled_sd3(variant).items() if name in MODELS}
                for variant in ("5-medium", "5-large")}


@pytest.mark.parametrize("variant, diffusers_type", [("5-medium", "sd35_medium"),
                                                     ("5-large", "sd35_large")])
def test_full_size_layout_is_what_diffusers_detects_and_converts(full_size, variant, diffusers_type):
    """The whole incl_clips_t5 layout of both SD3.5 models (meta tensors): diffusers detects the
    model type, and its converters give back every model's own names and shapes; our header
    check picks the bundled configs for it."""
    models = full_size[variant]
    ckpt = sd3.components_to_original(models["transformer"], models["vae"],
                                      {name: models[name] for name in MODELS[2:]})
    assert theirs.infer_diffusers_model_type(ckpt) == diffusers_type
    vae_config = dict(models["vae"].config)
    converted = {
        "transformer": theirs.convert_sd3_transformer_checkpoint_to_diffusers(
            {k: v for k, v in ckpt.items() if k.startswith(sd3.TRANSFORMER_PREFIX)}),
        "vae": theirs.convert_ldm_vae_checkpoint(ckpt, vae_config),
        "text_encoder": theirs.convert_ldm_clip_checkpoint(ckpt, sd3.TEXT_PREFIXES["text_encoder"]),
        "text_encoder_2": theirs.convert_ldm_clip_checkpoint(ckpt, sd3.TEXT_PREFIXES["text_encoder_2"]),
        "text_encoder_3": theirs.convert_sd3_t5_checkpoint_to_diffusers(ckpt),
    }
    converted["text_encoder"]["text_projection.weight"] = torch.empty(768, 768)  # diffusers: eye
    for name, state in converted.items():
        own = {k: tuple(v.shape) for k, v in models[name].state_dict().items()}
        if name == "text_encoder_3":
            own.pop(sd3.T5_TIED[1])  # the tied embedding, written once
        assert {k: tuple(v.shape) for k, v in state.items()} == own, name
    header = Header(bundled_folder("x"), {k: tuple(v.shape) for k, v in ckpt.items()})
    for name in MODELS:
        assert choose_config(header, name, bundled_sd3(variant))[1] == "the bundled config", name


# --- the memory estimate ----------------------------------------------------------------------

# The meta-device counts of the bundled configs. Published figures: SD3.5 Medium "2.5B", Large
# "8.1B": the transformers' parameters are 2.243B and 8.057B, and their position tables (a
# buffer, 384^2 x 1536 and 192^2 x 2432 values, also in the files and in memory) make 2.470B
# and 8.146B, which is what is counted. T5-XXL's encoder: 4.762B with its embedding once.
MEDIUM = memory.count_folder(bundled_folder("stable-diffusion-3.5-medium"))
LARGE = memory.count_folder(bundled_folder("stable-diffusion-3.5-large"))
CLIP_L, CLIP_G, T5_XXL = 123_650_304, 694_659_840, 4_762_310_656


def test_sd35_counts_from_the_bundled_configs():
    assert MEDIUM.unet == 2_243_171_520 + 384**2 * 1536 == 2_469_663_936
    assert LARGE.unet == 8_056_627_520 + 192**2 * 2432 == 8_146_280_768
    for counts in (MEDIUM, LARGE):
        assert counts.text_encoders == CLIP_L + CLIP_G + T5_XXL and counts.t5 == T5_XXL
        assert counts.vae == 83_819_683
    assert MEDIUM.mmdit == (1536, 24, 13, 2) and LARGE.mmdit == (2432, 38, 0, 2)


def test_a_single_sd3_files_counts_come_from_its_header(tmp_path, tiny):
    path = save_single_file(tiny, tmp_path / "t.safetensors", torch.float32)
    counts = memory.count_single_file(path)
    in_state = lambda m: sum(v.numel() for v in m.state_dict().values())  # noqa: E731
    assert counts.unet == in_state(tiny.transformer)  # parameters and the position table
    assert counts.t5 == sum(p.numel() for p in tiny.text_encoder_3.parameters())
    clip_l = sum(p.numel() for n, p in tiny.text_encoder.named_parameters() if "projection" not in n)
    assert counts.text_encoders == counts.t5 + clip_l + sum(p.numel() for p in tiny.text_encoder_2.parameters())
    assert counts.mmdit == (32, 3, 2, 2)
    assert memory.count_base(str(path)) == counts


def test_sd35_large_plan_says_what_fits_with_and_without_t5(monkeypatch):
    monkeypatch.setattr(memory, "count_base", lambda base: LARGE)
    monkeypatch.setattr(memory, "available_gib", lambda: (30.0, "RAM"))
    config = load_config(None, ['train.mixed_precision="bf16"', "data.resolution=1024",
                                "train.batch_size=1", "train.gradient_checkpointing=true"])
    line = memory.plan_line(config)
    # 8.15B + 0.82B in bf16 = 16.7 GiB, T5 8.9 GiB; with ~2 GiB of activations and adapter
    assert "transformer 8.15B, CLIP-L + CLIP-G 0.82B, T5-XXL 4.76B" in line
    assert "take 16.7 GiB, T5 8.9 GiB more" in line
    assert "24 GiB GPU: without T5 only; 16 GiB GPU: no; 12 GiB GPU: no" in line
    assert "the 30 GiB RAM available here: yes, with T5" in line
    with_t5 = memory.estimate(LARGE, 1024, 1, "bf16", True, False, (None, "RAM"))
    without = memory.estimate(LARGE, 1024, 1, "bf16", True, False, (None, "RAM"), load_t5=False)
    assert with_t5.weights_gib - without.weights_gib == pytest.approx(T5_XXL * 2 / 2**30)
    assert 18 < without.total_gib < 24 < with_t5.total_gib
    # checkpointing keeps ~1/10 of the MMDiT's activations; T5 left out in the config
    full = memory.estimate(LARGE, 1024, 1, "bf16", False, False, (None, "RAM"))
    assert full.activations_gib > 8 * with_t5.activations_gib
    off = memory.plan_line(load_config(None, ['train.mixed_precision="bf16"', "data.resolution=1024",
                                              "model.load_t5=false"]))
    assert "model.load_t5 = false (" not in off  # not offered as a fix when already off


def test_sd35_medium_fits_smaller_gpus_without_t5(monkeypatch):
    monkeypatch.setattr(memory, "count_base", lambda base: MEDIUM)
    monkeypatch.setattr(memory, "available_gib", lambda: (None, "RAM"))
    config = load_config(None, ['train.mixed_precision="bf16"', "data.resolution=1024",
                                "train.batch_size=1", "train.gradient_checkpointing=true"])
    line = memory.plan_line(config)
    # 2.47B + 0.82B in bf16 = 6.1 GiB, T5 8.9 GiB: 16.0 GiB with T5 (a 16 GiB GPU leaves
    # torch ~15.5), 7.1 GiB without
    assert "take 6.1 GiB, T5 8.9 GiB more" in line and "16.0 GiB with T5, 7.1 without" in line
    assert "24 GiB GPU: yes, with T5; 16 GiB GPU: without T5 only; 12 GiB GPU: without T5 only" in line
