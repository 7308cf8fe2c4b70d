"""Files we write, loaded by diffusers itself, act exactly like the model that trained them.

The reference is the in-memory PEFT-injected tiny pipeline (unet r4/alpha 8, text encoder
r4/alpha 2, lora_B random so that the adapter does something). Each exported file is loaded into
a fresh pipeline by `pipe.load_lora_weights(path)`; the UNet and text-encoder outputs must match,
and after `fuse_lora()` each targeted layer's weight change must equal `alpha / r * B @ A`,
module by module, so that a layer diffusers silently skipped fails the test.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from sd_lora.adapters.apply import AdapterApplyError, apply_adapters
from sd_lora.adapters.files import component_modules, load_adapter, save_adapter
from sd_lora.formats.adapter_state import AdapterState, LoraModule
from sd_lora.lora.inject import add_lora, read_adapter_state, target_module_names
from sd_lora.models.builtin.tiny import build_tiny_pipeline
from tests.lora_helpers import fill_lora_B

UNET_R, UNET_ALPHA, TE_R, TE_ALPHA = 4, 8, 4, 2
# One layer of each component with its own rank / alpha, to exercise rank_pattern/alpha_pattern.
ODD_UNET = "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v"
ODD_TE = "encoder.layers.1.mlp.fc1"
# Measured: load_lora_weights 0.0 on outputs and fused weights; apply_adapters 0.0 on weights and
# ~1.5e-6 on outputs (merged W + dW rounds differently from the separate LoRA branch).
FP32_TOLERANCE = 1e-5


def trained_pipe(odd: bool):
    """The tiny pipeline with PEFT LoRA layers and random nonzero weights."""
    pipe = build_tiny_pipeline(seed=0)
    if not odd:
        add_lora(pipe.unet, "unet", ("attn", "ff"), UNET_R, UNET_ALPHA)
        add_lora(pipe.text_encoder, "text_encoder", ("attn", "mlp"), TE_R, TE_ALPHA)
    else:  # what a config with rank_pattern / alpha_pattern would train
        for model, suffixes, r, alpha, pattern in (
            (pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], UNET_R, UNET_ALPHA, ODD_UNET),
            (
                pipe.text_encoder,
                ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                TE_R,
                TE_ALPHA,
                ODD_TE,
            ),
        ):
            config = LoraConfig(
                r=r,
                lora_alpha=alpha,
                target_modules=target_module_names(model, suffixes),
                rank_pattern={pattern: 2},
                alpha_pattern={pattern: 5},
            )
            inject_adapter_in_model(config, model)
    fill_lora_B((pipe.unet, pipe.text_encoder), seed=1, scale=0.1)
    return pipe


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder hidden states, UNet prediction) for fixed inputs."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 49406, (2, 77), generator=gen)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)  # fixed encoder states for the UNet
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        noise = pipe.unet(latents, torch.tensor([10, 700]), context).sample
    return text, noise


def trained_state(odd: bool):
    pipe = trained_pipe(odd)
    state = read_adapter_state({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "sd1")
    return state, outputs(pipe)


@pytest.fixture(scope="module")
def uniform():
    """Every module at r 4; alpha 8 in the UNet, 2 in the text encoder."""
    return trained_state(odd=False)


@pytest.fixture(scope="module")
def patterned():
    """As `uniform`, but one module per component at r 2, alpha 5."""
    return trained_state(odd=True)


def assert_outputs_match(pipe, reference, label: str) -> float:
    text, noise = outputs(pipe)
    diff = max((text - reference[0]).abs().max().item(), (noise - reference[1]).abs().max().item())
    print(f"{label}: max abs diff of outputs {diff:.2e}")
    assert diff < FP32_TOLERANCE, (label, diff)
    return diff


def assert_weight_deltas(pipe, base, state, label: str) -> None:
    """Each adapted layer changed by exactly its module's delta; nothing else changed."""
    layers, worst = component_modules(pipe), 0.0
    for component, modules in layers.items():
        for path, layer in modules.items():
            weight = (
                layer.get_base_layer().weight if isinstance(layer, BaseTunerLayer) else layer.weight
            )
            lora = state.modules.get(component, {}).get(path)
            expected = base[component][path].weight + (lora.delta() if lora is not None else 0)
            worst = max(worst, (weight - expected).abs().max().item())
            assert torch.allclose(weight, expected, rtol=0, atol=FP32_TOLERANCE), (
                label,
                component,
                path,
            )
    print(f"{label}: max abs diff of fused weights {worst:.2e}")


def save_and_load_with_diffusers(tmp_path, state, fmt, dtype=torch.float32):
    path = save_adapter(state, tmp_path / f"{fmt}.safetensors", format=fmt, dtype=dtype)
    pipe = build_tiny_pipeline(seed=0)
    pipe.load_lora_weights(str(path))
    for component in ("unet", "text_encoder"):
        wrapped = sum(isinstance(m, BaseTunerLayer) for m in getattr(pipe, component).modules())
        assert wrapped == len(state.modules[component]), (fmt, component, "layers skipped")
    return pipe, path


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_loads_our_file_like_the_trained_model(tmp_path, uniform, fmt):
    state, reference = uniform
    pipe, path = save_and_load_with_diffusers(tmp_path, state, fmt)
    assert_outputs_match(pipe, reference, f"{fmt} file via load_lora_weights")
    pipe.fuse_lora()
    assert_weight_deltas(
        pipe, component_modules(build_tiny_pipeline(seed=0)), state, f"{fmt} fused"
    )
    with pytest.raises(AdapterApplyError, match="unload_lora_weights"):
        apply_adapters(pipe, [load_adapter(path)])


def test_diffusers_layout_keeps_per_module_rank_and_alpha(tmp_path, patterned):
    state, reference = patterned
    pipe, _ = save_and_load_with_diffusers(tmp_path, state, "diffusers")
    assert_outputs_match(pipe, reference, "patterned diffusers file via load_lora_weights")
    pipe.fuse_lora()
    assert_weight_deltas(
        pipe, component_modules(build_tiny_pipeline(seed=0)), state, "patterned fused"
    )


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match")
def test_diffusers_gives_a_kohya_file_one_alpha_per_component(tmp_path, patterned):
    """A diffusers 0.42.1 limitation, not a file defect: its kohya reader mangles the names of
    per-module alphas, so every module gets the component's most common alpha. Our own loader
    (and A1111 / ComfyUI, which read `.alpha` per module) apply them right; if this test starts
    failing, diffusers has fixed it and the caveat in docs/formats.md can go."""
    state, _ = patterned
    pipe, _ = save_and_load_with_diffusers(tmp_path, state, "kohya")
    pipe.fuse_lora()
    base = component_modules(build_tiny_pipeline(seed=0))
    fused = component_modules(pipe)
    for component, path, common in (
        ("unet", ODD_UNET, UNET_ALPHA),
        ("text_encoder", "text_model." + ODD_TE, TE_ALPHA),
    ):
        odd = state.modules[component][path]
        got = fused[component][path].weight - base[component][path].weight
        assert odd.alpha == 5 and odd.r == 2
        torch.testing.assert_close(got, odd.delta() * common / odd.alpha, rtol=0, atol=1e-6)


def test_the_base_differs_so_the_comparison_means_something(uniform):
    text, noise = outputs(build_tiny_pipeline(seed=0))
    assert (text - uniform[1][0]).abs().max() > 1e-2 and (noise - uniform[1][1]).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["uniform", "patterned"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_our_apply_matches_the_trained_model(tmp_path, request, variant, fmt):
    state, reference = request.getfixturevalue(variant)
    path = save_adapter(state, tmp_path / f"{fmt}.safetensors", format=fmt, dtype=torch.float32)
    pipe = build_tiny_pipeline(seed=0)
    apply_adapters(pipe, [(load_adapter(path), 1.0, 1.0)])
    assert_outputs_match(pipe, reference, f"{variant} {fmt} file via apply_adapters")
    assert_weight_deltas(
        pipe, component_modules(build_tiny_pipeline(seed=0)), state, f"{fmt} applied"
    )


def test_fp16_file_is_close(tmp_path, uniform):
    state, reference = uniform
    pipe, _ = save_and_load_with_diffusers(tmp_path, state, "kohya", dtype=torch.float16)
    text, noise = outputs(pipe)
    diff = max((text - reference[0]).abs().max().item(), (noise - reference[1]).abs().max().item())
    print(f"fp16 kohya file via load_lora_weights: max abs diff of outputs {diff:.2e}")
    assert diff < 1e-3


def test_diffusers_own_kohya_converter_loses_alpha_and_writes_lora_te1(tmp_path):
    """The pitfall `to_kohya` avoids: convert_state_dict_to_kohya writes alpha=rank, lora_te1_."""
    pipe = trained_pipe(odd=False)
    peft_dict = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    peft_dict.update(
        {f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(pipe.text_encoder).items()}
    )
    converted = convert_state_dict_to_kohya(peft_dict)
    alphas = {k: v.item() for k, v in converted.items() if k.endswith(".alpha")}
    assert set(alphas.values()) == {UNET_R}  # trained with alpha 8 (unet) and 2 (text encoder)
    te_keys = [k for k in converted if k.startswith("lora_te")]
    assert te_keys and all(k.startswith("lora_te1_") and "text_model" not in k for k in te_keys)
    # We read such a file (lora_te1_ is an accepted alias), and see the alphas it really holds.
    path = tmp_path / "converted.safetensors"
    save_file(converted, str(path), metadata={"ss_base_model_version": "sd_v1"})
    state = load_adapter(path)
    assert state.alphas() == {float(UNET_R)} and len(state.modules["text_encoder"]) == 12


def test_we_read_the_files_diffusers_writes(tmp_path, uniform):
    """diffusers' own save (transformers 5: text-encoder names without `text_model.`)."""
    from diffusers import StableDiffusionPipeline

    from sd_lora.adapters.inspect import inspect_adapter

    state, _ = uniform
    pipe = trained_pipe(odd=False)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    loaded = load_adapter(path, family="sd1")  # diffusers files do not state their family
    for component, modules in state.modules.items():
        assert set(loaded.modules[component]) == set(modules)
        for name, module in modules.items():
            got = loaded.modules[component][name]
            assert got.alpha == module.alpha and torch.equal(got.lora_B, module.lora_B)
    info = inspect_adapter(path)  # no family: still described, the problem said
    assert info["family"] is None and "family" in info["problems"][0]
    assert info["components"]["text_encoder"]["alphas"] == [TE_ALPHA]


def legacy_keys(state, style: str) -> dict[str, torch.Tensor]:
    """The state's tensors as diffusers' pre-PEFT training scripts wrote them (alpha = r)."""
    tensors = {}
    for component, modules in state.modules.items():
        for path, m in modules.items():
            for part, tensor in (("down", m.lora_A), ("up", m.lora_B)):
                if component == "unet" and style.startswith("attn_procs"):  # 0.14-0.19
                    head, _, proj = path.rpartition(".to_")
                    proj = "out" if proj == "out.0" else proj
                    key = f"{head}.processor.to_{proj}_lora.{part}.weight"
                    key = key if style == "attn_procs_bare" else f"unet.{key}"  # the oldest: bare
                elif component == "unet":  # 0.20-0.21, LoRACompatibleLinear
                    key = f"unet.{path}.lora.{part}.weight"
                else:
                    key = f"text_encoder.{path}.lora_linear_layer.{part}.weight"
                tensors[key] = tensor.contiguous()
    return tensors


@pytest.mark.parametrize("style", ["attn_procs_bare", "attn_procs", "lora_compatible"])
def test_older_diffusers_layouts_read_as_diffusers_itself_reads_them(tmp_path, uniform, style):
    state, _ = uniform
    attention = AdapterState(family="sd1", modules={
        "unet": {p: m for p, m in state.modules["unet"].items() if ".attn" in p},
        "text_encoder": state.modules["text_encoder"]})
    path = tmp_path / f"{style}.safetensors"
    save_file(legacy_keys(attention, style), path)
    ours = load_adapter(path, family="sd1")
    for component, modules in attention.modules.items():
        assert set(ours.modules[component]) == set(modules)
        for p, m in modules.items():
            assert ours.modules[component][p].alpha == m.r  # no alpha stored: alpha = r
            assert torch.equal(ours.modules[component][p].lora_A, m.lora_A)
    mine, base = build_tiny_pipeline(seed=0), component_modules(build_tiny_pipeline(seed=0))
    apply_adapters(mine, [(ours, 1.0, 1.0)])
    as_read = AdapterState(family="sd1", modules={  # what those scripts applied: up @ down
        c: {p: LoraModule(m.lora_A, m.lora_B, alpha=m.r) for p, m in mods.items()}
        for c, mods in attention.modules.items()})
    assert_weight_deltas(mine, base, as_read, f"legacy {style}")
    if style == "attn_procs_bare":
        # Measured: diffusers 0.42 finds "no LoRA keys ... with the prefix='unet'" in these and
        # leaves the UNet as it was (a file that loads and does nothing); we read them.
        return
    theirs = build_tiny_pipeline(seed=0)
    theirs.load_lora_weights(str(path))
    assert_outputs_match(theirs, outputs(mine), f"legacy {style} via load_lora_weights")


def test_full_size_sd15_kohya_layout_equals_the_reference_converter():
    """SD 1.5's full-size UNet and CLIP ViT-L (built on the meta device from the bundled config),
    every target group at rank 1: our kohya key set and shapes equal those that diffusers'
    maintained `convert_state_dict_to_kohya` gives for PEFT LoRA on the same layers, once its
    two known departures from sd-scripts' layout are undone (it writes `lora_te1_` and, under
    transformers 5, drops the `text_model.` level; see the test above)."""
    from sd_lora.formats.adapter_state import canonical_name
    from sd_lora.formats.kohya import to_kohya
    from sd_lora.lora.inject import target_suffixes
    from tests.test_models import meta_components

    unet, _, text_encoder = meta_components("stable-diffusion-v1-5")
    modules: dict = {}
    reference: dict[str, torch.Tensor] = {}
    for component, model, groups in (("unet", unet, ("attn", "proj", "ff")),
                                      ("text_encoder", text_encoder, ("attn", "mlp"))):
        names = target_module_names(model, target_suffixes(component, groups))
        for name in names:
            weight = model.get_submodule(name).weight
            tail = (1,) * (weight.dim() - 2)
            modules.setdefault(component, {})[canonical_name(component, name)] = LoraModule(
                torch.zeros(1, *weight.shape[1:]), torch.zeros(weight.shape[0], 1, *tail), 1.0)
        inject_adapter_in_model(LoraConfig(r=1, lora_alpha=1, target_modules=names), model)
        reference.update({f"{component}.{k}": v for k, v in get_peft_model_state_dict(model).items()})
    ours = {k: tuple(v.shape) for k, v in to_kohya(AdapterState("sd1", modules)).items()}
    theirs = {}
    for key, value in convert_state_dict_to_kohya(reference).items():
        key = key.replace("lora_te1_", "lora_te_")
        if key.startswith("lora_te_") and not key.startswith("lora_te_text_model_"):
            key = key.replace("lora_te_", "lora_te_text_model_", 1)
        theirs[key] = tuple(value.shape)
    # 16 transformer blocks x (attn1 4 + attn2 4 + ff 2 + proj_in/out 2); 12 CLIP layers x 6
    assert (len(modules["unet"]), len(modules["text_encoder"])) == (192, 72)
    assert len(ours) == 3 * (192 + 72)  # lora_down, lora_up, alpha each
    assert ours == theirs
