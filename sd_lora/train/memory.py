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


@dataclass(frozen=True)
class ParameterCounts:
    unet: int
    text_encoders: int
    vae: int


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
    from sd_lora.models.single_file_header import read_header

    shapes = read_header(path).shapes
    numel = {prefix: 0 for prefix in ("model.diffusion_model.", "first_stage_model.", "text")}
    for key, shape in shapes.items():
        n = int(torch.Size(shape).numel())
        if key.startswith("model.diffusion_model."):
            numel["model.diffusion_model."] += n
        elif key.startswith("first_stage_model."):
            numel["first_stage_model."] += n
        elif key.startswith(("cond_stage_model.", "conditioner.")):
            numel["text"] += n
    return ParameterCounts(numel["model.diffusion_model."], numel["text"], numel["first_stage_model."])


def count_folder(folder: Path) -> ParameterCounts:
    """From the configs alone: each component built on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(name: str) -> dict | None:
        path = folder / name / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def numel(model) -> int:
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        unet = numel(UNet2DConditionModel.from_config(config("unet")))
        vae = numel(AutoencoderKL.from_config(config("vae")))
        text = numel(CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))))
        if config("text_encoder_2") is not None:
            text += numel(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config("text_encoder_2"))))
    return ParameterCounts(unet, text, vae)


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
    unet = json.loads((folder / "unet" / "config.json").read_text())
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
             available: tuple[float | None, str] | None = None) -> MemoryEstimate:
    dtype_bytes = BYTES[mixed_precision]
    # cached latents: the VAE can stay unused; it is kept in fp32 only under fp16
    vae = 0 if cached_latents else counts.vae * (4 if mixed_precision == "fp16" else dtype_bytes)
    weights = (counts.unet + counts.text_encoders) * dtype_bytes + vae
    adapter = counts.unet * ADAPTER_SHARE * 4 * 7  # weights, gradients, two moments; 3 copied
    scale = batch * (resolution / 256) ** 2
    activations = ACTIVATION_GIB[mixed_precision] * scale
    if checkpointing:
        activations *= CHECKPOINTING_FACTOR
    have, where = available if available is not None else available_gib()
    return MemoryEstimate(weights / GIB, adapter / GIB, activations, have, where)


def fixes_for(mixed_precision: str, checkpointing: bool, batch: int, cached: bool) -> list[str]:
    """What would lower the estimate, most effective first."""
    fixes = []
    if mixed_precision == "no":
        fixes.append("train.mixed_precision = 'bf16' (halves the base's weights)")
    if not checkpointing:
        fixes.append("train.gradient_checkpointing = true (about half the activations)")
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
    resolution = 1024 if counts.unet > 2e9 else 512 if counts.unet > 1e8 else 64
    return _line(config, counts, resolution) + f" (at {resolution} px, the base's usual size)"


def _line(config, counts: ParameterCounts, resolution: int) -> str:
    data = config.data  # "auto" caches unless random crops need fresh pixels
    train = config.train
    cached = data.cache_latents in ("memory", "disk") or (data.cache_latents == "auto"
                                                          and data.center_crop)
    guess = estimate(counts, resolution, train.batch_size, train.mixed_precision,
                     train.gradient_checkpointing, cached)
    return guess.text(fixes_for(train.mixed_precision, train.gradient_checkpointing,
                                train.batch_size, cached))

