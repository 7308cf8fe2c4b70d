"""Loading base models from every source a user passes, offline, on tiny models.

Sources: the built-in tiny model, a diffusers folder, a hub id through a fake Hugging Face cache,
and single-file LDM `.safetensors` checkpoints (SD 1.x and SD 2.x), plus the refusals: pickles,
SDXL, LoRA files, unknown strings, uncached hub ids. Full-size SD 1.5 / 2.1 layouts are checked
on the meta device, against the bundled configs and against diffusers' own LDM converters.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as diffusers_ldm
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sd_lora.formats import ldm_checkpoint as ldm
from sd_lora.models.bases import BaseModelError
from sd_lora.models.builtin.tiny import build_tiny_pipeline, sd1_scheduler_config
from sd_lora.models.builtin.tiny_sdxl import build_tiny_sd2_pipeline
from sd_lora.models.families import model_family, prediction_type_of
from sd_lora.models.load import load_pipeline
from sd_lora.models.single_file import bundled_configs, choose_configs, save_single_file
from sd_lora.models.single_file_header import Header, expected_shapes
from sd_lora.models.tokenizers import clip_tokenizer, open_clip_tokenizer

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: with 2 intra-op threads a forward pass slows ~100x whenever another process
    holds a core (OpenMP threads wait on each other); one thread is as fast when idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@torch.no_grad()
def outputs(pipe, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Text-encoder, UNet and VAE outputs for fixed inputs (fp32 compare)."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = pipe.text_encoder(ids)
    hidden = text.last_hidden_state
    image = pipe.vae.decode(latents).sample
    return {
        "text": hidden,
        "pooled": text.pooler_output,
        "unet": pipe.unet(latents, 10, encoder_hidden_states=hidden).sample,
        "decoded": image,
        "encoded": pipe.vae.encode(image).latent_dist.mean,
    }


def prompt_ids(pipe) -> torch.Tensor:
    return pipe.tokenizer(
        ["a photo of a cat!"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids


def assert_same_outputs(original, loaded) -> None:
    """Every weight bit-identical, hence the same outputs. Outputs are compared to 1e-5, not
    bit for bit: weights read from a safetensors file are memory-mapped at addresses that are
    not 64-byte aligned, and on some CPUs (AMD EPYC with MKL) that picks other kernels whose
    results differ in the last bit (measured: 6e-7)."""
    for name in ("unet", "vae", "text_encoder"):
        want_sd, got_sd = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert want_sd.keys() == got_sd.keys(), name
        for key, value in want_sd.items():
            assert torch.equal(value, got_sd[key]), f"{name}.{key} differs"
    ids = prompt_ids(original)
    want, got = outputs(original, ids), outputs(loaded, ids)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=f"{name} output")


def assert_frozen(pipe, dtype=torch.float32) -> None:
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        assert not module.training, name
        for pname, p in module.named_parameters():
            assert not p.requires_grad, f"{name}.{pname} requires grad"
            assert p.dtype == dtype, f"{name}.{pname} is {p.dtype}"
            assert not p.is_meta, f"{name}.{pname} was not loaded"


def conventional_pipeline(family: str) -> StableDiffusionPipeline:
    """A small pipeline whose every non-inferable field follows the SD conventions the loader
    assumes without metadata (32 GroupNorm groups; 8 UNet heads in SD 1, 64-channel heads in
    SD 2 and in text encoders; quick_gelu / gelu), so shapes alone describe it exactly."""
    sd2 = family == "sd2"
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(64, 128) if sd2 else (32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=[1, 2] if sd2 else 8,
        cross_attention_dim=64,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=1,
            hidden_act="gelu" if sd2 else "quick_gelu",
        )
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=open_clip_tokenizer() if sd2 else clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**sd1_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def strip_metadata(path) -> None:
    save_file(load_file(path), path)


def meta_components(config_name: str):
    configs = bundled_configs(config_name)
    with torch.device("meta"):
        return (
            UNet2DConditionModel.from_config(configs.unet),
            AutoencoderKL.from_config(configs.vae),
            CLIPTextModel(CLIPTextConfig.from_dict(configs.text_encoder)),
        )


# --- built-in and diffusers folders ---------------------------------------------------------


def test_tiny_is_frozen_and_honours_dtype():
    assert_frozen(load_pipeline("tiny"))
    assert_frozen(load_pipeline("tiny", dtype=torch.bfloat16), torch.bfloat16)


def test_prediction_type_override_lands_in_scheduler_config():
    pipe = load_pipeline("tiny", prediction_type="v_prediction")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert prediction_type_of(pipe) == "v_prediction"
    with pytest.raises(BaseModelError, match="'x0'.*epsilon"):
        load_pipeline("tiny", prediction_type="x0")


def test_diffusers_folder_round_trip(tmp_path, tiny_pipe, no_network):
    tiny_pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    assert_frozen(loaded)
    assert_same_outputs(tiny_pipe, loaded)
    assert type(loaded.scheduler) is type(tiny_pipe.scheduler)


def test_diffusers_folder_text_encoder_keys(tmp_path, tiny_pipe):
    """transformers 5 writes CLIP keys without `text_model.`; hub folders have it. Both load."""
    tiny_pipe.save_pretrained(tmp_path)
    weights = tmp_path / "text_encoder" / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("text_model.") for k in keys)
    save_file({f"text_model.{k}": v for k, v in load_file(weights).items()}, weights)
    assert_same_outputs(tiny_pipe, load_pipeline(str(tmp_path)))


def test_folder_without_model_index_is_explained(tmp_path):
    with pytest.raises(BaseModelError, match="no model_index.json"):
        load_pipeline(str(tmp_path))


def test_other_pipeline_classes_are_refused_naming_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionInpaintPipeline"})
    )
    with pytest.raises(BaseModelError,
                       match="StableDiffusionInpaintPipeline.*StableDiffusionXLPipeline"):
        load_pipeline(str(tmp_path))


@torch.no_grad()
def test_sdxl_folder_loads_with_both_text_encoders(tmp_path):
    """A diffusers SDXL folder (save_pretrained of the tiny SDXL pipeline) loads frozen, as an
    SDXL pipeline, every weight bit-identical and the UNet's output on SDXL conditioning the
    same as the pipeline that wrote it."""
    from diffusers import StableDiffusionXLPipeline

    from sd_lora.models.text import (
        default_time_ids,
        encode_all,
        text_encoders_of,
        tokenize_all,
        tokenizers_of,
    )

    original = load_pipeline("tiny-sdxl")
    original.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(str(tmp_path))
    assert isinstance(loaded, StableDiffusionXLPipeline) and model_family(loaded) == "sdxl"
    assert_frozen(loaded)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want_sd, got_sd = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert want_sd.keys() == got_sd.keys(), name
        assert all(torch.equal(v, got_sd[k]) for k, v in want_sd.items()), name
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    results = []
    for pipe in (original, loaded):
        # No "!": once saved, the pad token "!" of the second tokenizer is a special token
        # that transformers matches in the text (id 0, not 256), as in SDXL's own tokenizer_2.
        ids = tokenize_all(tokenizers_of(pipe), ["a photo of a cat"])
        cond = encode_all(text_encoders_of(pipe), ids, default_time_ids(1, 64, 64))
        assert cond.hidden_states.shape == (1, 77, 80) and cond.pooled.shape == (1, 48)
        results.append(pipe.unet(latents, 10, **cond.unet_kwargs()).sample)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-5)
    assert ids[0, 1, -1] == 0 and ids[0, 0, -1] == 49407  # the second tokenizer pads with "!"


# --- hub ids --------------------------------------------------------------------------------


def test_hub_id_loads_from_the_cache_offline(tmp_path, tiny_pipe, monkeypatch, no_network):
    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--acme--tiny-sd"
    tiny_pipe.save_pretrained(repo / "snapshots" / FAKE_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_pipeline("acme/tiny-sd")
    assert_frozen(loaded)
    assert_same_outputs(tiny_pipe, loaded)


def test_uncached_hub_id_fails_fast_offline(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(BaseModelError) as err:
        load_pipeline("acme/not-cached")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "'acme/not-cached'" in message and "HF_HUB_OFFLINE" in message
    assert "local diffusers folder" in message and ".safetensors" in message


def test_unreachable_hub_id_names_it(tmp_path, monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    with pytest.raises(BaseModelError, match="'acme/gone'.*neither.*not reachable.*no route"):
        load_pipeline("acme/gone")


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["sd15", "not a model", "/no/such/dir/here"])
def test_unknown_base_lists_accepted_forms(base):
    with pytest.raises(BaseModelError) as err:
        load_pipeline(base)
    message = str(err.value)
    for form in ('"tiny"', "model_index.json", "runwayml/stable-diffusion-v1-5", ".safetensors"):
        assert form in message


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not opened")
    with pytest.raises(BaseModelError, match="pickle.*run code.*safetensors"):
        load_pipeline(str(path))


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(BaseModelError, match="no such file"):
        load_pipeline(str(tmp_path / "absent.safetensors"))


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        (
            [
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "model.diffusion_model.input_blocks.0.0.weight",
            ],
            r"no VAE \(first_stage_model",  # an SDXL file without its VAE
        ),
        (
            [
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "model.diffusion_model.input_blocks.0.0.weight",
                "first_stage_model.encoder.conv_in.weight",
            ],
            "shapes differ from SDXL base's",
        ),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA weights"),
        (["model.diffusion_model.input_blocks.0.0.weight"], "no text encoder"),
        (
            [
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                "model.diffusion_model.input_blocks.0.0.weight",
            ],
            r"no VAE \(first_stage_model",
        ),
        (["down_blocks.0.resnets.0.conv1.weight"], "model_index.json"),
    ],
)
def test_unsupported_single_files_are_explained(tmp_path, keys, reason):
    path = tmp_path / "odd.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, path)
    with pytest.raises(BaseModelError, match=reason) as err:
        load_pipeline(str(path))
    assert str(path) in str(err.value)


def test_non_safetensors_garbage_is_explained(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(BaseModelError, match="not a readable .safetensors"):
        load_pipeline(str(path))


# --- single files ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", [build_tiny_pipeline, build_tiny_sd2_pipeline])
def test_single_file_round_trip_is_bit_identical(tmp_path, build, no_network, caplog):
    original = build()
    for name in ("unet", "vae", "text_encoder"):
        getattr(original, name).eval()
    path = save_single_file(original, tmp_path / "tiny.safetensors", torch.float32)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.safetensors"]  # no temp file left
    with caplog.at_level(logging.INFO, logger="sd_lora.models.single_file"):
        loaded = load_pipeline(str(path))
    assert "metadata" in caplog.text
    assert_frozen(loaded)
    assert_same_outputs(original, loaded)
    assert model_family(loaded) == model_family(original)
    assert prediction_type_of(loaded) == prediction_type_of(original)
    assert loaded.tokenizer.pad_token_id == original.tokenizer.pad_token_id


def test_single_file_sd2_layout(tmp_path):
    pipe = build_tiny_sd2_pipeline()
    path = save_single_file(pipe, tmp_path / "sd2.safetensors", torch.float32)
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        fused = f.get_slice("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
        assert fused.get_shape() == [3 * 32, 32]  # q, k, v stacked
    # OpenCLIP keeps one more block than diffusers: SD 2 reads the penultimate layer.
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.2.") for k in keys)
    assert not any(k.startswith("cond_stage_model.model.transformer.resblocks.3.") for k in keys)
    assert "cond_stage_model.model.text_projection" in keys
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert metadata["modelspec.prediction_type"] == "v"


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_without_metadata_is_inferred_from_shapes(tmp_path, family, no_network, caplog):
    original = conventional_pipeline(family)
    path = save_single_file(original, tmp_path / "plain.safetensors", torch.float32)
    strip_metadata(path)
    with caplog.at_level(logging.INFO, logger="sd_lora.models.single_file"):
        loaded = load_pipeline(str(path))
    assert "inferred from the tensor shapes" in caplog.text
    assert_same_outputs(original, loaded)
    assert model_family(loaded) == family


def test_sd2_prediction_type_without_metadata(tmp_path, caplog):
    path = save_single_file(
        conventional_pipeline("sd2"), tmp_path / "p.safetensors", torch.float32
    )
    strip_metadata(path)
    with caplog.at_level(logging.WARNING, logger="sd_lora.models.single_file"):
        assert prediction_type_of(load_pipeline(str(path))) == "v_prediction"
    assert "prediction_type='epsilon'" in caplog.text
    pipe = load_pipeline(str(path), prediction_type="epsilon")
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.unet.config.upcast_attention is False  # the -base config was chosen
    save_file(load_file(path), path, metadata={"modelspec.prediction_type": "epsilon"})
    assert prediction_type_of(load_pipeline(str(path))) == "epsilon"


def test_single_file_honours_dtype_and_override(tmp_path):
    path = save_single_file(
        build_tiny_sd2_pipeline(), tmp_path / "t.safetensors", torch.float32
    )
    pipe = load_pipeline(str(path), dtype=torch.bfloat16, prediction_type="epsilon")
    assert_frozen(pipe, torch.bfloat16)
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_uninferable_single_file_names_file_and_reason(tmp_path):
    """A tiny SD 2 UNet's 32-channel blocks cannot hold 64-channel heads: no config fits."""
    path = save_single_file(
        build_tiny_sd2_pipeline(), tmp_path / "tiny2.safetensors", torch.float32
    )
    strip_metadata(path)
    with pytest.raises(BaseModelError, match="not multiples of 64") as err:
        load_pipeline(str(path))
    assert str(path) in str(err.value) and "stable-diffusion-2-1" in str(err.value)


def test_save_single_file_writes_safetensors_only(tmp_path, tiny_pipe):
    with pytest.raises(ValueError, match=".safetensors only"):
        save_single_file(tiny_pipe, tmp_path / "model.ckpt", torch.float32)


# --- families and full-size layouts (meta device) -------------------------------------------


@pytest.mark.parametrize(
    ("config_name", "family"),
    [
        ("stable-diffusion-v1-5", "sd1"),
        ("stable-diffusion-2-1", "sd2"),
        ("stable-diffusion-2-1-base", "sd2"),
    ],
)
def test_full_size_layouts_match_bundled_configs(config_name, family):
    unet, vae, text_encoder = meta_components(config_name)
    assert next(unet.parameters()).is_meta  # nothing allocated
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    assert model_family(pipe) == family
    configs = bundled_configs(config_name)
    header = Header(
        Path("full.safetensors"),
        expected_shapes(configs.unet, configs.vae, configs.text_encoder, family),
    )
    prediction = configs.scheduler.get("prediction_type", "epsilon")
    assert choose_configs(header, family, prediction).source == f"bundled config {config_name}"


def test_tiny_families():
    assert model_family(build_tiny_pipeline()) == "sd1"
    assert model_family(build_tiny_sd2_pipeline()) == "sd2"


@pytest.mark.parametrize(
    ("config_name", "family"), [("stable-diffusion-v1-5", "sd1"), ("stable-diffusion-2-1", "sd2")]
)
def test_tables_agree_with_diffusers_converters(config_name, family):
    """Our diffusers->LDM tables, read back by diffusers' own LDM->diffusers converters."""
    unet, vae, text_encoder = meta_components(config_name)
    state = ldm.components_to_ldm(unet, vae, text_encoder, family)
    back = {
        "unet": diffusers_ldm.convert_ldm_unet_checkpoint(state, dict(unet.config)),
        "vae": diffusers_ldm.convert_ldm_vae_checkpoint(state, dict(vae.config)),
        "text_encoder": (
            diffusers_ldm.convert_ldm_clip_checkpoint(state)
            if family == "sd1"
            else diffusers_ldm.convert_open_clip_checkpoint(text_encoder, state)
        ),
    }
    back["text_encoder"] = {
        k.removeprefix("text_model."): v for k, v in back["text_encoder"].items()
    }
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in back[name].items()} == want, name


SDXL_UNET = dict(
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    layers_per_block=2,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)


def test_unet_table_gives_sdxl_ldm_names():
    table = ldm.unet_module_table(SDXL_UNET)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert ldm.map_module_name(name, table) == "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert ldm.map_module_name("mid_block.attentions.0.proj_in", table) == "middle_block.1.proj_in"
    assert (
        ldm.map_module_name("up_blocks.0.resnets.2.conv1", table) == "output_blocks.2.0.in_layers.2"
    )
    assert ldm.map_module_name("up_blocks.0.upsamplers.0.conv", table) == "output_blocks.2.2.conv"
    inverse = ldm.invert(table)
    assert (
        ldm.map_module_name("input_blocks.4.1.proj_out", inverse)
        == "down_blocks.1.attentions.0.proj_out"
    )
    with pytest.raises(ldm.UnmappedKeyError, match="nonsense"):
        ldm.map_module_name("nonsense.layer", table)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET)
    back = diffusers_ldm.convert_ldm_unet_checkpoint(
        ldm.unet_to_ldm(unet.state_dict(), unet.config), SDXL_UNET
    )
    assert set(back) == set(unet.state_dict())


def test_a_folder_with_pickled_weights_is_refused(tmp_path):
    """`.bin` weights are pickles: the loader never falls back to them."""
    from sd_lora.models.builtin.tiny import build_tiny_pipeline

    folder = tmp_path / "pickled"
    build_tiny_pipeline().save_pretrained(folder, safe_serialization=False)
    assert not list((folder / "unet").glob("*.safetensors"))  # transformers still writes safetensors
    with pytest.raises(BaseModelError, match="safetensors"):
        load_pipeline(str(folder))
