"""Estimate a run's peak memory before any model loads, and say what to change when it will
not fit.

Parameters are counted without loading weights: from a single file's header shapes, or from a
diffusers folder's (or the hub cache's) configs built on the meta device, or from the
built-in bases. The estimate is

    weights     UNet and text encoders in the training dtype, the VAE in fp32
    adapter     LoRA weights, their gradients, two AdamW moments and the copy of weights and
                moments each step is taken over (nonfinite.StepSnapshot), fp32 (~1% of the UNet)
    activations ACTIVATION_GIB x batch x (resolution / 256)^2, halved by gradient
                checkpointing (per pixel SDXL's are no larger than SD 1.5's: its first level,
                where the pixels are, has no attention)

with ACTIVATION_GIB fitted to bench/train_speed.py's peaks on this machine's CPU; the estimate
against those measurements: SD 1.5 at 256 px fp32 5.40 vs 5.30 GiB, bf16 3.27 vs 3.21, with
checkpointing 4.75 vs 4.96 and 2.77 vs 2.97; SDXL at 512 px bf16 11.0 vs 10.34, with
checkpointing 9.0 vs 8.54. A guide (tests hold it within 15% of those), not a promise.

SD3's MMDiT is sized from its shape instead (`mmdit_activation_bytes`): the tensors autograd
keeps per token, per channel of width, per block. Counted (saved-tensor hooks, not a measured
peak) on SD3.5-shaped transformers cut to 4 blocks of width 256-768, bf16, attention LoRA, at
256-1024 px: 17.4-18.1 values, 11 more per image token in an MMDiT-X block (`attn2`), 1.2 with
gradient checkpointing (each block's input), which then recomputes one block at a time. The
weights count T5-XXL unless model.load_t5 = false; `sd3_line` says what fits which GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30
ACTIVATION_GIB = {"no": 1.3, "bf16": 1.0, "fp16": 1.0}  # per image at 256 px
CHECKPOINTING_FACTOR = 0.5
ADAPTER_SHARE = 0.01  # LoRA parameters per UNet parameter, about (rank 8-16 on attention)
BYTES = {"no": 4, "bf16": 2, "fp16": 2}
TIGHT_SHARE = 0.5  # an estimate above this share of the memory available is warned about
LARGE_SIZE_FACTOR = 2  # a training size above this many times the base's own is warned about


MMDIT_SAVED = 18  # values kept for backward per token, per channel, per block (see top)
MMDIT_DUAL_SAVED = 11  # more per image token in an MMDiT-X block
MMDIT_CHECKPOINTED = 1.2  # per block with gradient checkpointing
SD3_TEXT_TOKENS = 77 + 256  # the CLIPs' and T5's (zeros without T5): the text stream's length
GPU_SIZES_GIB = (24, 16, 12)
CUDA_CONTEXT_GIB = 0.5  # of a GPU's memory, what the CUDA context and kernels hold, not torch


@dataclass(frozen=True)
class ParameterCounts:
    unet: int  # the denoiser: a UNet, or SD3's MMDiT transformer (with its position table)
    text_encoders: int  # all of them, SD3's T5 included
    vae: int
    t5: int = 0  # SD3's T5-XXL (of text_encoders): not loaded with model.load_t5 = false
    mmdit: tuple[int, int, int, int] | None = None  # SD3: (width, blocks, MMDiT-X blocks, patch)


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    adapter_gib: float
    activations_gib: float
    available_gib: float | None  # GPU memory, or the machine's available RAM
    where: str  # "CUDA GPU" or "RAM"

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.adapter_gib + self.activations_gib

    def fits(self) -> bool:
        return self.available_gib is None or self.total_gib <= self.available_gib

    def tight(self) -> bool:
        """Fits, but takes more than TIGHT_SHARE of what is available: the rest of the
        machine (other programs, the OS's file cache) gets squeezed, and swapping is slow."""
        return self.available_gib is not None and self.total_gib > TIGHT_SHARE * self.available_gib

    def text(self, fixes: list[str]) -> str:
        line = (f"  memory: about {self.total_gib:.1f} GiB (weights {self.weights_gib:.1f}, "
                f"adapter and optimizer {self.adapter_gib:.2f}, activations "
                f"{self.activations_gib:.1f})")
        if self.available_gib is not None:
            line += f" of {self.available_gib:.1f} GiB {self.where} available"
        if not self.fits():
            line += "\n  warning: this will probably not fit; " + "; ".join(fixes)
        elif self.tight():
            line += (f"\n  warning: that is more than {TIGHT_SHARE:.0%} of the {self.where} "
                     "available, so other programs may be pushed out; " + "; ".join(fixes))
        return line


def count_single_file(path: Path) -> ParameterCounts:
    from sd_lora.formats import sd3_checkpoint as sd3
    from sd_lora.models.single_file_header import read_header

    shapes = read_header(path).shapes
    numel = {part: 0 for part in ("model.diffusion_model.", "first_stage_model.", "text", "t5")}
    for key, shape in shapes.items():
        n = int(torch.Size(shape).numel())
        if key.startswith("model.diffusion_model."):
            numel["model.diffusion_model."] += n
        elif key.startswith("first_stage_model."):
            numel["first_stage_model."] += n
        elif key.startswith(("cond_stage_model.", "conditioner.", sd3.TEXT_ROOT)) and not sd3.is_optional(key):
            numel["text"] += n
            numel["t5"] += n if key.startswith(sd3.TEXT_PREFIXES["text_encoder_3"]) else 0
    return ParameterCounts(numel["model.diffusion_model."], numel["text"], numel["first_stage_model."],
                           numel["t5"], _mmdit_shape_of_file(shapes))


def _mmdit_shape_of_file(shapes: dict) -> tuple[int, int, int, int] | None:
    blocks = {k.split(".")[3] for k in shapes if k.startswith("model.diffusion_model.joint_blocks.")}
    proj = shapes.get("model.diffusion_model.x_embedder.proj.weight")
    if not blocks or proj is None:
        return None
    dual = {k.split(".")[3] for k in shapes if ".x_block.attn2.qkv.weight" in k}
    return proj[0], len(blocks), len(dual), proj[2]


def count_folder(folder: Path) -> ParameterCounts:
    """From the configs alone: each component built on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(name: str) -> dict | None:
        path = folder / name / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def numel(model) -> int:
        return sum(p.numel() for p in model.parameters())

    if config("transformer") is not None:
        return _count_sd3_folder(config)
    with torch.device("meta"):
        unet = numel(UNet2DConditionModel.from_config(config("unet")))
        vae = numel(AutoencoderKL.from_config(config("vae")))
        text = numel(CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))))
        if config("text_encoder_2") is not None:
            text += numel(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config("text_encoder_2"))))
    return ParameterCounts(unet, text, vae)


def _count_sd3_folder(config) -> ParameterCounts:
    """SD3's components on the meta device: the transformer with its position table (a buffer
    as large as 9% of SD3.5 Medium's parameters), T5 with its tied embedding counted once."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def numel(model) -> int:
        return (sum(p.numel() for p in model.parameters())
                + sum(b.numel() for name, b in model.named_buffers() if name in model.state_dict()))

    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(config("transformer"))
        vae = numel(AutoencoderKL.from_config(config("vae")))
        text = sum(numel(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config(name))))
                   for name in ("text_encoder", "text_encoder_2") if config(name) is not None)
        t5 = (numel(T5EncoderModel(T5Config.from_dict(config("text_encoder_3"))))
              if config("text_encoder_3") is not None else 0)
    c = transformer.config
    shape = (c.num_attention_heads * c.attention_head_dim, c.num_layers,
             len(c.dual_attention_layers or ()), c.patch_size)
    return ParameterCounts(numel(transformer), text + t5, vae, t5, shape)


def count_base(base: str) -> ParameterCounts | None:
    """The base's parameter counts without loading it; None when they cannot be known here
    (a hub id not in the cache)."""
    from sd_lora.models.bases import RANDOM_BASES, base_kind

    kind = base_kind(base)
    if kind in RANDOM_BASES:
        return None  # a few million parameters: nothing to warn about
    if kind == "file":
        path = Path(base).expanduser()
        return count_single_file(path) if path.suffix.lower() == ".safetensors" else None
    folder = config_folder(base)
    return count_folder(folder) if folder is not None else None


def config_folder(base: str) -> Path | None:
    """The diffusers folder holding the base's configs (the toy's, a local folder, a hub id's
    cached snapshot), or None (a single file, a built-in random base, a hub id not cached)."""
    from sd_lora.models.bases import base_kind, hub_cache_dir, hub_repo_id

    kind = base_kind(base)
    if kind == "toy":
        from sd_lora.models.builtin.toy import toy_base_path

        return toy_base_path()
    if kind == "folder":
        return Path(base).expanduser()
    if kind != "hub":
        return None
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(hub_repo_id(base), "model_index.json", cache_dir=hub_cache_dir())
    return Path(index).parent if isinstance(index, str) else None


def native_size(base: str) -> int | None:
    """The image size the base was made for (its UNet's sample size times the VAE's scale),
    from its configs without loading weights; None when unknown here."""
    from sd_lora.models.bases import RANDOM_BASES
    from sd_lora.models.builtin.tiny import TINY_RESOLUTION

    if base in RANDOM_BASES:
        return TINY_RESOLUTION
    folder = config_folder(base)
    if folder is None:
        return None
    denoiser = folder / "unet" / "config.json"
    if not denoiser.is_file():
        denoiser = folder / "transformer" / "config.json"  # SD3
    unet = json.loads(denoiser.read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def available_gib() -> tuple[float | None, str]:
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free / GIB, "CUDA GPU"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB, "RAM"
    except OSError:
        pass
    return None, "RAM"


def estimate(counts: ParameterCounts, resolution: int, batch: int, mixed_precision: str,
             checkpointing: bool, cached_latents: bool = False,
             available: tuple[float | None, str] | None = None, load_t5: bool = True,
             rank: int = 8) -> MemoryEstimate:
    """`load_t5` and `rank` (of the denoiser's LoRA) are read for SD3 bases only."""
    dtype_bytes = BYTES[mixed_precision]
    # cached latents: the VAE can stay unused; it is kept in fp32 only under fp16
    vae = 0 if cached_latents else counts.vae * (4 if mixed_precision == "fp16" else dtype_bytes)
    text = counts.text_encoders - (0 if load_t5 else counts.t5)
    weights = (counts.unet + text) * dtype_bytes + vae
    have, where = available if available is not None else available_gib()
    if counts.mmdit is not None:
        activations = mmdit_activation_bytes(counts.mmdit, resolution, batch, dtype_bytes,
                                             checkpointing) / GIB
        adapter = mmdit_lora_parameters(counts.mmdit, rank) * 4 * 7
        return MemoryEstimate(weights / GIB, adapter / GIB, activations, have, where)
    adapter = counts.unet * ADAPTER_SHARE * 4 * 7  # weights, gradients, two moments; 3 copied
    scale = batch * (resolution / 256) ** 2
    activations = ACTIVATION_GIB[mixed_precision] * scale
    if checkpointing:
        activations *= CHECKPOINTING_FACTOR
    return MemoryEstimate(weights / GIB, adapter / GIB, activations, have, where)


def mmdit_activation_bytes(shape: tuple[int, int, int, int], resolution: int, batch: int,
                           dtype_bytes: int, checkpointing: bool) -> float:
    """What SD3's transformer keeps for backward (see the module doc), plus the one block's
    worth that backward works on at a time (with checkpointing: recomputed, and its gradients)."""
    width, blocks, dual, patch = shape
    image = (resolution // (8 * patch)) ** 2  # tokens: latents are 1/8 of the pixels a side
    tokens = image + SD3_TEXT_TOKENS
    per_block = MMDIT_SAVED * tokens * width
    if checkpointing:
        values = MMDIT_CHECKPOINTED * tokens * width * blocks + 2 * per_block
    else:
        values = per_block * (blocks + 1) + MMDIT_DUAL_SAVED * image * width * dual
    return values * batch * dtype_bytes


def mmdit_lora_parameters(shape: tuple[int, int, int, int], rank: int) -> int:
    """A rank-`rank` LoRA on the attention projections (the default targets): q, k, v and out
    of both streams in every block, and of `attn2` in MMDiT-X blocks; each width -> width."""
    width, blocks, dual, _ = shape
    return rank * 2 * width * (8 * blocks + 4 * dual)


def fixes_for(mixed_precision: str, checkpointing: bool, batch: int, cached: bool,
              checkpointing_saves: str = "about half the activations") -> list[str]:
    """What would lower the estimate, most effective first."""
    fixes = []
    if mixed_precision == "no":
        fixes.append("train.mixed_precision = 'bf16' (halves the base's weights)")
    if not checkpointing:
        fixes.append(f"train.gradient_checkpointing = true ({checkpointing_saves})")
    if batch > 1:
        fixes.append(f"a smaller train.batch_size with train.gradient_accumulation_steps (now {batch})")
    if not cached:
        fixes.append("data.cache_latents = 'disk'")
    fixes.append("a lower data.resolution")
    return fixes


def plan_line(config) -> str | None:
    """The plan's memory line for a job (when the base's size is known here) and a warning
    when the training size is far above the base's own; None when there is neither."""
    lines = [line for line in (_memory_line(config), _size_warning(config)) if line]
    return "\n".join(lines) or None


def _size_warning(config) -> str | None:
    resolution = config.data.resolution
    try:
        native = native_size(config.model.base)
    except Exception:  # an unreadable base is reported by the loader, with its own message
        return None
    if not resolution or native is None or resolution <= LARGE_SIZE_FACTOR * native:
        return None
    return (f"  warning: data.resolution {resolution} is {resolution / native:g}x the base's "
            f"native size, {native} px: it never saw images this large, and each step costs "
            f"about {(resolution / native) ** 2:.0f}x the activation memory and time. Train at "
            f"{native} (--resolution {native}), or leave data.resolution unset for the base's "
            "own size")


def _memory_line(config) -> str | None:
    try:
        counts = count_base(config.model.base)
    except Exception:  # an unreadable base is reported by the loader, with its own message
        return None
    if counts is None or not config.data.resolution:
        return None if counts is None else _native_line(config, counts)
    return _line(config, counts, config.data.resolution)


def _native_line(config, counts: ParameterCounts) -> str:
    # Without data.resolution the base's own: SDXL-sized UNets train at 1024, SD 2.x 768 / SD
    # 1.x 512; the exact value is known once the base loads, so this takes the common one.
    # (SD3: 1024, SD3.5 Medium's 2.5B included.)
    resolution = 1024 if counts.unet > 2e9 else 512 if counts.unet > 1e8 else 64
    first, newline, rest = _line(config, counts, resolution).partition("\n")
    return first + f" (at {resolution} px, the base's usual size)" + newline + rest


def _line(config, counts: ParameterCounts, resolution: int) -> str:
    data = config.data  # "auto" caches unless random crops need fresh pixels
    train = config.train
    cached = data.cache_latents in ("memory", "disk") or (data.cache_latents == "auto"
                                                          and data.center_crop)
    load_t5 = config.model.load_t5

    def guess(t5: bool, available=None) -> MemoryEstimate:
        return estimate(counts, resolution, train.batch_size, train.mixed_precision,
                        train.gradient_checkpointing, cached, available, t5, config.lora.unet_r)

    here = guess(load_t5)
    saves = "nine tenths of the activations" if counts.mmdit else "about half the activations"
    fixes = fixes_for(train.mixed_precision, train.gradient_checkpointing, train.batch_size, cached,
                      saves)
    if counts.t5 and load_t5:
        fixes.insert(0, f"model.load_t5 = false ({counts.t5 * BYTES[train.mixed_precision] / GIB:.1f} "
                        "GiB less)")
    line = here.text(fixes)
    if counts.mmdit is None:
        return line
    return line + "\n" + sd3_line(counts, train.mixed_precision, guess(False, (None, "")),
                                  guess(True, (None, "")) if counts.t5 else None,
                                  (here.available_gib, here.where))


def sd3_line(counts: ParameterCounts, precision: str, without_t5: MemoryEstimate,
             with_t5: MemoryEstimate | None, available: tuple[float | None, str]) -> str:
    """What an SD3 run needs with and without T5-XXL, against common GPU sizes and what is
    available here."""
    dtype, size = BYTES[precision], {"no": "fp32"}.get(precision, precision)
    clips = counts.text_encoders - counts.t5
    if not clips:  # a base file without text encoders: the loader refuses it, saying why
        return (f"  SD3: transformer {counts.unet / 1e9:.2f}B parameters; the file holds no CLIP "
                "text encoders, which SD3 needs, so this estimate leaves out their 0.82B")
    line = (f"  SD3: transformer {counts.unet / 1e9:.2f}B, CLIP-L + CLIP-G {clips / 1e9:.2f}B"
            + (f", T5-XXL {counts.t5 / 1e9:.2f}B" if counts.t5 else "") + " parameters; in "
            f"{size} the transformer and CLIPs take {(counts.unet + clips) * dtype / GIB:.1f} GiB")
    if with_t5 is not None:
        line += (f", T5 {counts.t5 * dtype / GIB:.1f} GiB more. This run needs about "
                 f"{with_t5.total_gib:.1f} GiB with T5, {without_t5.total_gib:.1f} without it "
                 "(model.load_t5 = false: prompts then reach the model through the CLIPs only; "
                 "data.cache_text_encoder_outputs saves T5's time each step, not its memory)")
    else:
        line += f"; this run needs about {without_t5.total_gib:.1f} GiB (no T5)"
    sizes = [(f"{gib} GiB GPU", gib - CUDA_CONTEXT_GIB) for gib in GPU_SIZES_GIB]
    if available[0] is not None:
        sizes.append((f"the {available[0]:.0f} GiB {available[1]} available here", available[0]))
    verdicts = [f"{name}: {_fits(without_t5, with_t5, gib)}" for name, gib in sizes]
    return line + ".\n  fits " + "; ".join(verdicts)


def _fits(without_t5: MemoryEstimate, with_t5: MemoryEstimate | None, gib: float) -> str:
    if with_t5 is not None and with_t5.total_gib <= gib:
        return "yes, with T5"
    if without_t5.total_gib <= gib:
        return "without T5 only" if with_t5 is not None else "yes"
    return "no"

