"""Load (and write) an SD3 / SD3.5 single-file checkpoint offline: `sd3.5_large.safetensors`,
`sd3.5_medium.safetensors` and their "incl_clips" variants (layout: `formats.sd3_checkpoint`).

Each component in the file gets the first config whose expected tensors match the file's
exactly, as for SD 1.x/2.x/SDXL (`single_file`): the configs `save_single_file` stored in the
file's metadata; the bundled SD 3.5 Medium or Large configs (`assets/configs/`, by the MMDiT's
structure: second attention = Medium); else the bundled config with every field the shapes
determine taken from the file (64-channel heads, as in every SD3 model and its text encoders).
The models are built on the meta device and the file is read one tensor at a time, straight in
the training dtype (`streamed.iter_tensors_as`): the peak is the loaded models plus one tensor.

Text encoders: CLIP-L and CLIP-G must be in the file (the base files hold none: then the error
says what to pass instead). T5-XXL needs its real tokenizer, which cannot be made offline: it is
taken from a `tokenizer_3` folder beside the file (the layout of the stabilityai hub repos, which
hold the single file beside the diffusers folders) or from the Hugging Face cache; without one,
or without T5 weights, the pipeline has no T5 (`text_encoder_3=None`, as diffusers allows) and a
one-line note says what that costs.
"""

from __future__ import annotations

import json
import logging
import math
from importlib import resources
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd_lora.formats import sd3_checkpoint as sd3
from sd_lora.formats.ldm_checkpoint import VAE_PREFIX, vae_to_ldm
from sd_lora.models.bases import BaseModelError, hub_cache_dir
from sd_lora.models.single_file_header import Header, HeaderError, infer_vae_fields
from sd_lora.models.streamed import cast_buffers, iter_tensors_as
from sd_lora.models.tokenizers import clip_tokenizer, open_clip_tokenizer

logger = logging.getLogger(__name__)

BUNDLED_SD3 = {"5-medium": "stable-diffusion-3.5-medium", "5-large": "stable-diffusion-3.5-large"}
HEAD_WIDTH = 64  # channels per head: SD3's MMDiT, CLIP-L, CLIP-G and T5-XXL alike
MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
CLIPS = ("text_encoder", "text_encoder_2")
# Where a T5 tokenizer may be cached (repo, subfolder): the SD3 repos' own, then T5's.
T5_TOKENIZER_REPOS = (
    ("stabilityai/stable-diffusion-3.5-large", "tokenizer_3"),
    ("stabilityai/stable-diffusion-3.5-medium", "tokenizer_3"),
    ("stabilityai/stable-diffusion-3.5-large-turbo", "tokenizer_3"),
    ("stabilityai/stable-diffusion-3-medium-diffusers", "tokenizer_3"),
    ("google/t5-v1_1-xxl", ""),
)
NO_T5_COST = ("prompts reach the model through CLIP-L and CLIP-G only (77 tokens; weaker prompt "
              "following and text rendering), as when T5 is left out to save memory")


def variant_of(shapes: dict) -> str:
    """sd-scripts' SD3 model type from the MMDiT's structure (see families.model_variant)."""
    if any(".x_block.attn2." in k for k in shapes):
        return "5-medium"
    return "5-large" if any(".attn.ln_q." in k for k in shapes) else "medium"


def bundled_sd3(variant: str) -> dict[str, dict]:
    """{component: config} of the bundled SD 3.5 folder for `variant` (SD3 Medium: Large's,
    whose text encoders, VAE and scheduler are the same; its transformer is inferred)."""
    name = BUNDLED_SD3.get(variant, BUNDLED_SD3["5-large"])
    folder = Path(str(resources.files("sd_lora") / "assets" / "configs" / name))
    files = {name: f"{name}/config.json" for name in MODELS}
    files["scheduler"] = "scheduler/scheduler_config.json"
    return {name: json.loads((folder / rel).read_text()) for name, rel in files.items()}


# --- configs from shapes ----------------------------------------------------------------------


def _need(h: dict, key: str) -> tuple[int, ...]:
    if key not in h:
        raise HeaderError(f"expected tensor {key!r} is missing")
    return h[key]


def _indices(h: dict, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".")[0]) for k in h if k.startswith(prefix)})


def _heads(width: int, what: str) -> int:
    if width % HEAD_WIDTH:
        raise HeaderError(f"cannot tell the {what}'s attention heads: width {width} is not a "
                          f"multiple of {HEAD_WIDTH}")
    return width // HEAD_WIDTH


def infer_fields(name: str, h: dict) -> dict:
    """The config fields of component `name` that its tensors (`h`: keys without the
    component's prefix) determine."""
    if name == "transformer":
        width, in_channels, patch, _ = _need(h, "x_embedder.proj.weight")
        blocks = _indices(h, "joint_blocks.")
        positions = _need(h, "pos_embed")[1]
        side = math.isqrt(positions)
        if blocks != list(range(len(blocks))) or side * side != positions:
            raise HeaderError(f"irregular MMDiT: blocks {blocks}, {positions} positions")
        return dict(
            patch_size=patch, in_channels=in_channels,
            out_channels=_need(h, "final_layer.linear.weight")[0] // patch**2,
            num_layers=len(blocks), attention_head_dim=HEAD_WIDTH,
            num_attention_heads=_heads(width, "transformer"),
            joint_attention_dim=_need(h, "context_embedder.weight")[1],
            caption_projection_dim=_need(h, "context_embedder.weight")[0],
            pooled_projection_dim=_need(h, "y_embedder.mlp.0.weight")[1],
            pos_embed_max_size=side,
            dual_attention_layers=[i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in h],
            qk_norm="rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in h else None,
        )
    if name == "vae":
        return infer_vae_fields({VAE_PREFIX + k: v for k, v in h.items()})
    if name == "text_encoder_3":
        vocab, width = h.get("shared.weight") or _need(h, "encoder.embed_tokens.weight")
        attention = "encoder.block.0.layer.0.SelfAttention."
        buckets, heads = _need(h, attention + "relative_attention_bias.weight")
        return dict(vocab_size=vocab, d_model=width, num_layers=len(_indices(h, "encoder.block.")),
                    num_heads=heads, d_kv=_need(h, attention + "q.weight")[0] // heads,
                    d_ff=_need(h, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
                    relative_attention_num_buckets=buckets)
    vocab, width = _need(h, "text_model.embeddings.token_embedding.weight")
    return dict(  # CLIP-L's projection is an identity (formats.sd3_checkpoint): width wide
        vocab_size=vocab, hidden_size=width,
        max_position_embeddings=_need(h, "text_model.embeddings.position_embedding.weight")[0],
        num_hidden_layers=len(_indices(h, "text_model.encoder.layers.")),
        intermediate_size=_need(h, "text_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_attention_heads=_heads(width, name), projection_dim=h.get("text_projection.weight", (width,))[0],
    )


def build_on_meta(name: str, config: dict) -> torch.nn.Module:
    """Component `name` built from `config` with its parameters on the meta device. Wholly on
    meta but for the CLIPs, whose position ids (a buffer not in the file) must be real: the
    transformer's position table (the file's) would otherwise be computed, up to 0.9 GB."""
    if name in CLIPS:
        with init_empty_weights():
            return CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config))
    with torch.device("meta"):
        if name == "transformer":
            return SD3Transformer2DModel.from_config(config)
        if name == "vae":
            return AutoencoderKL.from_config(config)
        return T5EncoderModel(T5Config.from_dict(config))  # on meta its embedding stays tied


def expected_shapes(name: str, config: dict) -> dict[str, tuple]:
    """File key -> shape that `config` gives component `name` (built on the meta device)."""
    model = build_on_meta(name, config)
    state = model.state_dict()
    if name == "transformer":
        tensors = sd3.transformer_to_original(state)
    elif name == "vae":
        tensors = vae_to_ldm(state, model.config)
    else:
        tensors = sd3.text_encoder_to_original(name, state)
    return {k: tuple(v.shape) for k, v in tensors.items()}


def mismatches(header: Header, name: str, expected: dict[str, tuple]) -> list[str]:
    prefix = sd3.PREFIXES[name]
    have = {k: v for k, v in header.shapes.items() if k.startswith(prefix) and not sd3.is_optional(k)}
    want = {k: v for k, v in expected.items() if not sd3.is_optional(k)}
    flat = lambda s: tuple(d for d in s if d != 1)  # noqa: E731 (VAE attention: 1x1 conv or matrix)
    return ([f"missing {k} {want[k]}" for k in sorted(want.keys() - have.keys())]
            + [f"unexpected {k} {have[k]}" for k in sorted(have.keys() - want.keys())]
            + [f"{k}: file {have[k]} vs config {want[k]}" for k in sorted(want.keys() & have.keys())
               if have[k] != want[k] and flat(have[k]) != flat(want[k])])


def choose_config(header: Header, name: str, bundled: dict) -> tuple[dict, str]:
    """(config, where it came from) for component `name`: the first candidate that fits."""
    stored = (header.configs_metadata() or {}).get(name)
    candidates = [("the file's stored config", stored)] if stored else []
    candidates.append(("the bundled config", bundled[name]))
    rejected = []
    for source, config in candidates + [("a config inferred from the shapes", None)]:
        try:
            if config is None:
                prefix = sd3.PREFIXES[name]
                h = {k[len(prefix):]: v for k, v in header.shapes.items() if k.startswith(prefix)}
                config = dict(bundled[name], **infer_fields(name, h))
            problems = mismatches(header, name, expected_shapes(name, config))
        except HeaderError as e:
            problems = [str(e)]
        except Exception as e:  # a config the libraries cannot build (bad head count, ...)
            problems = [f"cannot build it: {e}"]
        if not problems:
            return config, source
        rejected.append(f"{source}: {len(problems)} differences, e.g. {problems[:3]}")
    raise HeaderError(f"no config fits its {name} tensors. " + "; ".join(rejected))


# --- loading ----------------------------------------------------------------------------------


HUB_IDS = {"5-large": "stabilityai/stable-diffusion-3.5-large",
           "5-medium": "stabilityai/stable-diffusion-3.5-medium",
           "medium": "stabilityai/stable-diffusion-3-medium-diffusers"}


def load_sd3_single_file(header: Header, dtype: torch.dtype,
                         load_t5: bool = True) -> StableDiffusion3Pipeline:
    """The SD3 pipeline of the checkpoint `header` describes, in `dtype` (see the module doc);
    without `load_t5` its T5 is not read. Raises BaseModelError naming the file and what to do."""
    path, shapes = header.path, header.shapes
    _refuse_scaled_fp8(header)
    present = [n for n in MODELS if any(k.startswith(sd3.PREFIXES[n]) for k in shapes)]
    variant = variant_of(shapes)
    missing = [n for n in CLIPS if n not in present]
    if missing:
        raise BaseModelError(_no_clips_message(path, missing, variant))
    bundled = bundled_sd3(variant)
    try:
        chosen = {name: choose_config(header, name, bundled) for name in present}
    except HeaderError as e:
        raise BaseModelError(f"cannot load {path} as an SD3 base model: {e}") from e
    logger.info("%s: SD3 (%s), configs: %s", path, variant,
                ", ".join(f"{n} from {source}" for n, (_, source) in chosen.items()))
    configs = {name: config for name, (config, _) in chosen.items()}
    tokenizer_3 = None
    if not load_t5:
        configs.pop("text_encoder_3", None)  # asked for (model.load_t5 = false): no note
    elif "text_encoder_3" in configs:
        tokenizer_3, looked = find_t5_tokenizer(path)
        if tokenizer_3 is None:
            del configs["text_encoder_3"]  # its 4.7B parameters are not even read
            logger.warning("%s: T5-XXL not loaded: its tokenizer is not available offline (looked "
                           "in %s); %s. To use T5, put the tokenizer_3 folder of %s beside the file",
                           path, looked, NO_T5_COST, HUB_IDS.get(variant, HUB_IDS["5-large"]))
    else:
        logger.warning("%s: no T5-XXL in the file, so none is loaded: %s", path, NO_T5_COST)
    try:
        models = _load_models(path, configs, dtype)
    except (KeyError, ValueError) as e:  # our shape check passed, so this is unexpected
        raise BaseModelError(f"cannot read {path} as an SD3 checkpoint: {e}") from e
    scheduler = (header.configs_metadata() or {}).get("scheduler") or bundled["scheduler"]
    return StableDiffusion3Pipeline(
        transformer=models["transformer"],
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler),
        vae=models["vae"],
        text_encoder=models["text_encoder"], tokenizer=clip_tokenizer(),
        text_encoder_2=models["text_encoder_2"], tokenizer_2=open_clip_tokenizer(),
        text_encoder_3=models.get("text_encoder_3"), tokenizer_3=tokenizer_3,
    )


def _load_models(path: Path, configs: dict[str, dict], dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Each configured component built on meta and filled from the file, tensor by tensor."""
    models = {name: build_on_meta(name, config) for name, config in configs.items()}
    states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in models}
    transformer = models["transformer"].config
    width = transformer.num_attention_heads * transformer.attention_head_dim
    inverse_vae = sd3.vae_inverse_table(models["vae"].config)
    for key, tensor in iter_tensors_as(path, dtype, lambda k: sd3.component_of(k) in models):
        name = sd3.component_of(key)
        inner = key[len(sd3.PREFIXES[name]):]
        if name == "transformer":
            states[name].update(sd3.transformer_from_original(inner, tensor, width))
        elif name == "vae":
            states[name].update([sd3.vae_from_ldm(inner, tensor, inverse_vae)])
        else:
            states[name].update((k, tensor) for k in sd3.text_encoder_from_original(name, inner))
    clip_l = models["text_encoder"].config.hidden_size  # SD3 reads CLIP-L's pooled unprojected
    states["text_encoder"]["text_projection.weight"] = torch.eye(clip_l, dtype=dtype)
    for name, model in models.items():
        state = states.pop(name)
        expected = set(model.state_dict())
        if state.keys() != expected:
            raise ValueError(f"{name}: missing {sorted(expected - state.keys())[:3]}, "
                             f"unexpected {sorted(state.keys() - expected)[:3]}")
        model.load_state_dict(state, strict=True, assign=True)
        if name == "text_encoder_3":  # assign=True gives T5's two embedding names two Parameters
            model.tie_weights()
        cast_buffers(model, dtype).eval()
    return models


def _refuse_scaled_fp8(header: Header) -> None:
    scaled = [k for k in header.shapes if k.endswith((".scale_weight", ".scale_input"))]
    if "scaled_fp8" in header.shapes or scaled:
        raise BaseModelError(
            f"{header.path} is an fp8-scaled checkpoint (ComfyUI's *_fp8_scaled: fp8 weights with "
            f"per-layer scales, e.g. {scaled[:1]}), which is not read here; pass the original "
            "bf16/fp16 sd3.5_*.safetensors or the model's diffusers folder")


def _no_clips_message(path: Path, missing: list[str], variant: str) -> str:
    names = {"text_encoder": "CLIP-L (text_encoders.clip_l.*)",
             "text_encoder_2": "CLIP-G (text_encoders.clip_g.*)"}
    message = (
        f"{path} holds the SD3 transformer and VAE but not {' or '.join(names[n] for n in missing)}, "
        f"and SD3 needs both CLIP text encoders; no random ones are made up. Pass the model's "
        f"diffusers folder or its hub id ({HUB_IDS.get(variant, HUB_IDS['5-large'])}), or a "
        "checkpoint that includes them (an *_incl_clips*.safetensors file)")
    index = path.parent / "model_index.json"
    if index.is_file() and "StableDiffusion3Pipeline" in index.read_text():
        message += f". The folder it is in, {path.parent}, is a diffusers SD3 pipeline: pass that folder"
    return message


def find_t5_tokenizer(path: Path):
    """(T5 tokenizer, where from), or (None, the places looked in): a `tokenizer_3` folder
    beside the file, then the SD3 and T5 repos in the Hugging Face cache. Never downloads."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import T5TokenizerFast

    cache = hub_cache_dir()
    folders = [path.parent / "tokenizer_3"]
    for repo, sub in T5_TOKENIZER_REPOS:
        for file in ("tokenizer.json", "spiece.model"):
            found = try_to_load_from_cache(repo, f"{sub}/{file}".lstrip("/"), cache_dir=cache)
            if isinstance(found, str):
                folders.append(Path(found).parent)
                break
    for folder in folders:
        if (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file():
            try:
                return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True), str(folder)
            except Exception as e:  # spiece.model alone needs sentencepiece; a broken download
                logger.info("%s: cannot read a T5 tokenizer there: %s", folder, e)
    return None, f"{folders[0]} and the Hugging Face cache at {cache}"


# --- writing: the reverse ---------------------------------------------------------------------


def sd3_tensors(pipe, text_encoders: bool = True) -> dict[str, torch.Tensor]:
    """The pipeline's models in the SD3 single-file layout; no text encoders (the layout of
    sd3.5_large.safetensors) unless `text_encoders`; T5 only when the pipe has one."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3") if text_encoders else ()
    projection = pipe.text_encoder.text_projection.weight
    if text_encoders and not torch.equal(projection, torch.eye(*projection.shape, dtype=projection.dtype)):
        logger.warning("CLIP-L's text_projection is not an identity matrix, and the SD3 layout has "
                       "no place for it: every reader of the file (diffusers, ComfyUI, sd-lora) "
                       "uses an identity, so its pooled CLIP-L output differs from this pipeline's")
    return sd3.components_to_original(pipe.transformer, pipe.vae,
                                      {n: getattr(pipe, n, None) for n in names})


def sd3_configs_metadata(pipe, text_encoders: bool = True) -> dict:
    """The exact diffusers configs of what `sd3_tensors` writes, for `sd_lora.configs`."""
    scheduler = dict(pipe.scheduler.config, _class_name=type(pipe.scheduler).__name__)
    configs = {"transformer": dict(pipe.transformer.config), "vae": dict(pipe.vae.config),
               "scheduler": scheduler}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3") if text_encoders else ():
        if getattr(pipe, name, None) is not None:
            configs[name] = getattr(pipe, name).config.to_dict()
    return configs
