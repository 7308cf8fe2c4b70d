"""A diffusers folder's models read tensor by tensor (sd_lora.models.streamed) are exactly the
models diffusers and transformers load themselves, and what they cannot vouch for is left to
those loaders."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_lora.models.builtin.tiny import build_tiny_pipeline
from sd_lora.models.builtin.tiny_sdxl import build_tiny_sdxl_pipeline
from sd_lora.models.load import PIPELINE_CLASSES, load_pipeline
from sd_lora.models.streamed import (
    keys_as_model,
    load_component,
    read_tensors_as,
    streamed_components,
)

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


def libraries_own(folder, dtype):
    """The pipeline as diffusers' from_pretrained loads it, with nothing read by us."""
    name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    cls, extra = PIPELINE_CLASSES[name]
    return cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, **extra)


def assert_same_models(ours, theirs):
    for name in MODELS:
        a, b = getattr(ours, name, None), getattr(theirs, name, None)
        if b is None:
            continue
        assert type(a) is type(b), name
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sb:
            assert sa[key].dtype == sb[key].dtype, (name, key)
            assert torch.equal(sa[key], sb[key]), (name, key)
        buffers_a = dict(a.named_buffers())
        for key, buffer in b.named_buffers():  # the non-persistent ones too (position ids)
            assert buffers_a[key].dtype == buffer.dtype and torch.equal(buffers_a[key], buffer), key
        if hasattr(b, "register_to_config"):
            assert dict(a.config) == dict(b.config), name


@pytest.mark.parametrize("build", [build_tiny_pipeline, build_tiny_sdxl_pipeline],
                         ids=["sd1", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_saved_folder_loads_streamed_exactly_as_the_libraries_load_it(tmp_path, build, dtype):
    build().save_pretrained(tmp_path)  # fp32 files, as most diffusers folders of SD 1.5 are
    streamed = streamed_components(tmp_path, dtype)
    expected = {n for n in MODELS if (tmp_path / n).is_dir()}
    assert set(streamed) == expected  # every model was read by us, none left to diffusers
    ours, theirs = load_pipeline(str(tmp_path), dtype=dtype), libraries_own(tmp_path, dtype)
    assert_same_models(ours, theirs)
    assert not ours.unet.training and not any(p.requires_grad for p in ours.unet.parameters())
    # The same UNet output. Not bit for bit in fp32: diffusers leaves fp32 weights in the file's
    # memory map at unaligned addresses (data_ptr % 64 == 56 here), which takes other SIMD paths
    # (6e-7 apart); ours are fresh, aligned copies, as any cast load's are.
    torch.manual_seed(0)
    latents = torch.randn(1, ours.unet.config.in_channels, 8, 8, dtype=dtype)
    text = torch.randn(1, 77, ours.unet.config.cross_attention_dim, dtype=dtype)
    extra = {}
    if ours.unet.config.addition_embed_type == "text_time":
        pooled = ours.text_encoder_2.config.projection_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, dtype=dtype),
                                       "time_ids": torch.zeros(1, 6, dtype=dtype)}}
    with torch.no_grad():
        a = ours.unet(latents, 10, text, **extra).sample
        b = theirs.unet(latents, 10, text, **extra).sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_sharded_model_is_read_from_all_its_shards(tmp_path):
    pipe = build_tiny_pipeline()
    pipe.unet.save_pretrained(tmp_path / "unet", max_shard_size="100KB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = load_component(tmp_path / "unet", "diffusers", "UNet2DConditionModel", torch.bfloat16)
    assert ours is not None
    for key, tensor in pipe.unet.state_dict().items():
        assert torch.equal(ours.state_dict()[key], tensor.to(torch.bfloat16)), key


def test_a_file_with_other_keys_is_left_to_the_libraries_loader(tmp_path):
    build_tiny_pipeline().save_pretrained(tmp_path)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["not_a_module.weight"] = torch.zeros(2)  # diffusers ignores it (with a warning)
    save_file(tensors, weights)
    assert load_component(tmp_path / "unet", "diffusers", "UNet2DConditionModel",
                          torch.float32) is None
    assert "unet" not in streamed_components(tmp_path, torch.float32)
    ours = load_pipeline(str(tmp_path), dtype=torch.bfloat16)  # diffusers loads it then
    assert_same_models(ours, libraries_own(tmp_path, torch.bfloat16))


def test_read_tensors_equals_safetensors_for_every_dtype_and_shape(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2, 2).bfloat16(),
        "i64": torch.arange(9).reshape(3, 3), "u8": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5), "flag": torch.tensor([True, False]),
    }
    save_file(tensors, tmp_path / "t.safetensors", metadata={"a": "b"})
    as_is = read_tensors_as(tmp_path / "t.safetensors")
    assert as_is.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert as_is[key].dtype == tensor.dtype and torch.equal(as_is[key], tensor), key
    cast = read_tensors_as(tmp_path / "t.safetensors", torch.bfloat16)
    for key, tensor in tensors.items():  # floating ones cast, the rest as they were
        want = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert cast[key].dtype == want.dtype and torch.equal(cast[key], want), key
    cast["f32"] += 1  # a copy of its own: the file is not written
    assert torch.equal(load_file(tmp_path / "t.safetensors")["f32"], tensors["f32"])


def test_a_truncated_file_is_an_error_naming_it(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="t.safetensors: tensor w ends past the end"):
        read_tensors_as(tmp_path / "t.safetensors")


def test_keys_as_model_strips_only_a_prefix_that_gives_exactly_the_models_keys():
    t = torch.zeros(1)
    expected = {"a.weight", "b.weight"}
    assert keys_as_model({"a.weight": t, "b.weight": t}, expected) is not None
    assert set(keys_as_model({"m.a.weight": t, "m.b.weight": t}, expected)) == expected
    assert keys_as_model({"m.a.weight": t, "n.b.weight": t}, expected) is None
    assert keys_as_model({"m.a.weight": t}, expected) is None
