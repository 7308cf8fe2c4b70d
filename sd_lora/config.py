"""The training job's configuration: one frozen dataclass per concern, loaded from TOML.

Unknown keys and wrong types are errors that name the dotted field and what is accepted; nothing
is silently corrected. Command-line `--set section.field=value` overrides use TOML value syntax.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from sd_lora.choices import (
    DEFAULT_RANGE,
    LEARNING_RATE_RANGE,
    TARGET_GROUPS,
    parse_optimizer_args,
    parse_patterns,
)
from sd_lora.errors import UserError
from sd_lora.util.words import plural

CONFIG_VERSION = 1
# report.style: the toy world's styles (sd_lora.world.styles.TOY_STYLES), kept here as names so
# loading a config does not import the world.
REPORT_STYLES = ("auto", "none", "stripes", "pastel", "outline", "pixel", "sepia", "golden")

MixedPrecision = Literal["no", "fp16", "bf16"]
PredictionType = Literal["auto", "epsilon", "v_prediction"]
VaePrecision = Literal["auto", "fp32"]
LrSchedule = Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"]
LossKind = Literal["l2", "huber", "smooth_l1"]
TimestepSampling = Literal["logit_normal", "mode", "uniform"]
RegularizationTarget = Literal["noise", "base"]
CacheMode = Literal["auto", "none", "memory", "disk"]
OptimizerName = Literal["adamw", "adamw8bit", "prodigy", "adafactor"]
ExportFormat = Literal["kohya", "diffusers"]
ExportDtype = Literal["fp16", "bf16", "fp32"]


@dataclass(frozen=True)
class Marker:
    """What a field lets a job touch, carried by its type (typing.Annotated). The app's job
    check (sd_lora.services.job_guard) and --resume's path comparison find the fields by these markers,
    so a new field that names a file or folder is covered once it is declared with one of the
    types below; tests/test_job_guard.py fails on a new text field that is not classified."""

    what: str


READS = Marker("a file or folder the job reads")
WRITES = Marker("a folder the job writes into")
BASE = Marker("a base model: a built-in name, a hub id or a path")
UNPICKLES = Marker("true lets the job open pickle files")
ReadPath = Annotated[str, READS]
WritePath = Annotated[str, WRITES]
BaseName = Annotated[str, BASE]
Unpickles = Annotated[bool, UNPICKLES]


class ConfigError(UserError):
    """A configuration problem; the message names the dotted field."""


@dataclass(frozen=True)
class ModelConfig:
    base: BaseName = "toy"  # "toy", "tiny", a diffusers folder, a hub id (hf://org/name: never looked up on disk) or a single-file .safetensors
    prediction_type: PredictionType = "auto"  # "auto": what the base's scheduler says
    # Open a .ckpt/.pt base (a pickle) at all; even then only tensors are read (sd_lora.util.pickles).
    allow_pickle: Unpickles = False
    # The VAE's precision for encoding and decoding: "auto" keeps it in the weights' dtype (as
    # sd-scripts and diffusers' trainer do), except fp32 under fp16, where the SD VAEs overflow;
    # "fp32" always (for a base whose VAE misbehaves in bf16; costs time and memory).
    vae_precision: VaePrecision = "auto"
    # SD3's T5-XXL text encoder (4.7B parameters, 9.5 GB in bf16). false: not loaded, zeros in
    # its place as diffusers' pipeline does; prompts then reach the model through the two
    # CLIPs alone (77 tokens), with weaker prompt following and text in images. T5 never
    # trains. Other families have no T5 and ignore it.
    load_t5: bool = True


@dataclass(frozen=True)
class DataConfig:
    path: ReadPath = "datasets/toy/stripes"  # the folder of images and captions (searched recursively; kohya `N_name` subfolders repeat)
    # An sd-scripts dataset config ([[datasets]] / [[datasets.subsets]]) to train from instead
    # of data.path and data.regularization: its subsets, repeats, is_reg folders and caption
    # options, and its resolution, batch size and bucket settings (see data.sd_scripts_toml).
    dataset_config: ReadPath = ""
    resolution: int = 0  # pixels; 0 means the base's native resolution
    center_crop: bool = True  # crop the square (or bucket) from the centre; false: at a random offset, drawn per item and epoch
    random_flip: bool = False  # mirror a random half of the items each epoch
    caption_extensions: tuple[str, ...] = (".txt", ".caption")  # caption file extensions tried beside each image, in order
    # The share of the style's items trained with an empty caption (sd-scripts'
    # caption_dropout_rate): the adapter also learns the style unprompted. 0: never.
    caption_dropout: float = 0.0
    # sd-scripts' shuffle_caption / keep_tokens: the comma-separated tags in a new order for
    # each item and epoch, the first keep_tokens tags (the trigger word) left in front.
    shuffle_tags: bool = False
    keep_tokens: int = 0  # with shuffle_tags: how many leading tags stay in place
    # Aspect-ratio bucketing (sd-scripts' enable_bucket): each image trains at the bucket size
    # nearest its own shape (sides multiples of bucket_reso_steps, area at most resolution^2)
    # instead of a square crop; batches come from one bucket. The plan is printed at the start
    # and written to the adapter's ss_bucket_info.
    enable_bucket: bool = False
    bucket_reso_steps: int = 64  # pixels; a multiple of 8
    min_bucket_reso: int = 0  # the shortest side a bucket may have; 0: half the resolution
    max_bucket_reso: int = 0  # the longest; 0: twice the resolution
    bucket_no_upscale: bool = False  # smaller images keep their size (rounded down to the step)
    # Encode each image with the VAE once (sd-scripts' cache_latents, cache_latents_to_disk):
    # "memory", or "disk" (in data.cache_dir, reused by later runs on the same files and VAE);
    # "auto": cached whenever nothing needs fresh pixels each epoch (random crops do; flips are
    # cached both ways), in memory up to 1 GiB of latents, else on disk; "none": encoded every
    # step. The posterior is cached, so training still samples a new latent every step and
    # trains as uncached. Entries are keyed by file content, size, crop, flip and VAE (see
    # data.latent_cache). "memory" and "disk" need centre crops.
    cache_latents: CacheMode = "auto"
    cache_dir: WritePath = ""  # "": <train.output_dir>/latent-cache
    # Encode each distinct caption once while the text encoders are frozen (sd-scripts'
    # cache_text_encoder_outputs; needs lora.train_text_encoder = false). Caption dropout and tag
    # shuffling still work: a caption is encoded when first seen, then reused.
    cache_text_encoder_outputs: bool = False
    # Masked loss (sd-scripts' masked_loss): each pixel's loss weighted by a mask, from each
    # image's alpha channel, or from the same-name image in data.mask_path (white trains,
    # black is ignored; an image without a mask trains whole).
    masked_loss: bool = False
    mask_path: ReadPath = ""  # a folder of masks; "": the images' alpha channels
    # Held-out images for a validation loss (see train.validation_every): a folder of
    # captioned images, or the share of data.path's images set aside (chosen by a hash of the
    # seed and each file's content, so every run splits alike). Held-out images never train.
    validation_path: ReadPath = ""
    validation_split: float = 0.0  # the share of data.path held out (0: none); or use validation_path
    # Regularization images (DreamBooth's prior preservation, sd-scripts' reg_data_dir): a folder
    # of images NOT in the style, captioned without the trigger word, trained alongside (repeated
    # or cut to as many items per epoch as the style images) so that the adapter learns to change
    # what the trigger word asks for and to leave other prompts alone. "": none.
    regularization: ReadPath = ""
    # The loss weight of regularization images (DreamBooth's and sd-scripts' prior_loss_weight).
    # Images the base already draws well have a small loss, so at weight 1 the style's gradient
    # outweighs theirs and the adapter still changes other prompts; a larger weight holds them.
    regularization_weight: float = 1.0
    # The share of regularization items trained with an empty caption. Classifier-free guidance
    # subtracts the empty prompt's prediction, and the adapter applies to it too: untrained, it
    # drifts toward the style, and guidance then pushes generations AWAY from the style. Plain
    # images with an empty caption keep that prediction the base's own.
    regularization_caption_dropout: float = 0.0
    # What regularization images are trained toward. "noise": the noise added to them, like
    # any image (sd-scripts, DreamBooth). "base": the base model's own prediction for the same
    # noisy image and caption, with the adapter off (output preservation): the loss is then
    # exactly how far the adapter moves prompts that do not ask for the style, and fitting
    # the images' noise better than the base does (which also changes other prompts) earns
    # nothing. Costs one extra forward pass without gradients per batch with such images.
    regularization_target: RegularizationTarget = "noise"


@dataclass(frozen=True)
class LoraConfig:
    unet_r: int = 8  # rank of the UNet LoRA
    unet_alpha: float = 8.0  # alpha of the UNet LoRA (the delta is alpha / r * B @ A)
    # groups: attn, proj, ff, conv (LoCon: the ResNet blocks); SD3's transformer: attn (both
    # streams' attention), ff, adaln. lora.unet_* are the denoiser's: SD3's transformer too.
    unet_targets: tuple[str, ...] = ("attn",)
    # The rank and alpha of the 3x3 convolutions of the `conv` group (sd-scripts' conv_dim,
    # conv_alpha); their 1x1 shortcuts and time projections take unet_r / unet_alpha.
    conv_r: int = 4
    conv_alpha: float = 1.0  # alpha of those 3x3 convolutions
    train_text_encoder: bool = True  # also train LoRA on the text encoder(s)
    text_encoder_r: int = 4  # rank of the text-encoder LoRA
    text_encoder_alpha: float = 4.0  # alpha of the text-encoder LoRA
    text_encoder_targets: tuple[str, ...] = ("attn",)  # groups: attn, mlp
    # SDXL only: also train its second text encoder (OpenCLIP ViT-bigG), with the same rank,
    # alpha and targets as the first, when train_text_encoder is on.
    train_text_encoder_2: bool = True
    # Rank and alpha by module, PEFT's rank_pattern / alpha_pattern: "regex=value" entries, the
    # regex matched against the end of each adapted module's name (e.g. "up_blocks.1.*=16",
    # "attn2.to_k=2"); the first matching entry wins. Each must match some adapted module.
    rank_pattern: tuple[str, ...] = ()
    alpha_pattern: tuple[str, ...] = ()  # "regex=alpha" entries, as rank_pattern
    # DoRA (PEFT's use_dora): each adapted layer also learns one magnitude per output row; the
    # kohya export carries them as dora_scale (out, 1), the diffusers export as PEFT's
    # lora_magnitude_vector. Only sd-lora and diffusers apply them as trained; see docs/formats.md.
    use_dora: bool = False
    dropout: float = 0.0  # LoRA dropout (PEFT's lora_dropout) on every adapted layer's input, in [0, 1)
    # sd-scripts' dropouts on the adapter's own path, training only (sd_lora/lora/dropouts.py):
    network_dropout: float = 0.0  # element-wise on the rank-r hidden state (sd-scripts' --network_dropout)
    rank_dropout: float = 0.0  # whole rank dimensions per sample, delta rescaled (network_args rank_dropout)
    module_dropout: float = 0.0  # a module's whole delta left out per step (network_args module_dropout)


@dataclass(frozen=True)
class TrainConfig:
    # The run folder: checkpoints, samples, logs, the adapter. "": runs/<train.name>, or
    # runs/<train.name>-2, -3, ... when that one holds another run (resuming: the latest of them).
    output_dir: WritePath = ""
    # The adapter's file name (without .safetensors) and ss_output_name. "": the name of the
    # data folder (data.path), or of the data.dataset_config file.
    name: str = ""
    max_steps: int = 0  # optimizer steps to train; 0: the base's recommendation (sd_lora.train.recommended: printed in the plan; 1500 for SD bases)
    batch_size: int = 4  # images per micro-batch (per process)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 0.0  # UNet LoRA; 0: the base's recommendation (the toy base's tuned value; 1e-4 for SD 1.x, 2.x, SDXL)
    text_encoder_learning_rate: float = 0.0  # text encoder LoRA; 0: the base's recommendation (5e-5 for SD 1.x, 2.x, SDXL)
    text_encoder_2_learning_rate: float = 0.0  # SDXL's second encoder; 0: text_encoder_learning_rate
    lr_scheduler: LrSchedule = "constant"  # the learning-rate schedule (each with lr_warmup_steps)
    lr_warmup_steps: int = 0  # a linear ramp from 0, for every schedule (constant included)
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts: how many times the cosine restarts
    lr_scheduler_power: float = 1.0  # polynomial: the decay's power (1: linear)
    # The loss on each element: "l2" (squared error), or sd-scripts' pseudo-Huber forms, robust
    # to outliers: "huber" 2c(sqrt(e^2 + c^2) - c), "smooth_l1" 2(sqrt(e^2 + c^2) - c), c =
    # huber_c. Both are ~e^2 for |e| << c; past c they grow like |e|.
    loss: LossKind = "l2"
    huber_c: float = 0.1  # the Huber losses' c
    # adamw (torch), adamw8bit (bitsandbytes, CUDA only), prodigy (prodigyopt: it sets its own
    # step size, so learning rates are multipliers, 1.0 as advised), adafactor (transformers,
    # fixed learning rate). See sd_lora.train.optimizers.
    optimizer: OptimizerName = "adamw"
    # More keyword arguments for the optimizer, sd-scripts' optimizer_args: ["d_coef=2"]
    optimizer_args: tuple[str, ...] = ()
    # LoRA+ (sd-scripts' loraplus_lr_ratio): the up projections (lora_B) learn this many times
    # faster than the down projections (16 is the paper's choice); 0: off.
    loraplus_lr_ratio: float = 0.0
    adam_beta1: float = 0.9  # AdamW's beta1, in [0, 1)
    adam_beta2: float = 0.999  # AdamW's beta2, in [0, 1)
    adam_weight_decay: float = 1e-2  # AdamW's decoupled weight decay
    adam_epsilon: float = 1e-8  # AdamW's epsilon, above 0 (at 0 a zero gradient gives a NaN weight)
    max_grad_norm: float = 1.0  # clip the LoRA gradients to this norm; 0: no clipping
    # A step whose loss or gradients hold NaN/inf is skipped (nothing is updated), and one whose
    # update makes a weight NaN/inf is undone (weights and optimizer state put back); this many
    # in a row stop the run with the likely cause, the last checkpoint intact. 0: never stop.
    max_nonfinite_steps: int = 10
    # sd-scripts' noise_offset: add `noise_offset * N(0, 1)` per image and channel to the noise.
    # SD's schedule never fully hides an image's mean colour, so without it an adapter cannot
    # learn to change overall colour or brightness (a palette style). 0.05-0.1 is common.
    noise_offset: float = 0.0
    # sd-scripts' adaptive_noise_scale: the offset of each image and channel grows by this
    # times the absolute mean of that latent channel (needs noise_offset).
    adaptive_noise_scale: float = 0.0
    # Pyramid noise (sd-scripts' multires_noise_iterations / _discount): coarser noise added
    # on top, `discount`^i as strong at level i; 6-10 iterations and 0.3 are usual. 0: off.
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3  # how much weaker each coarser level is
    # sd-scripts' debiased_estimation_loss: each sample's loss weighted by 1/sqrt(SNR)
    # (epsilon) or 1/(SNR + 1) (v-prediction), SNR capped at 1000.
    debiased_estimation: bool = False
    # Min-SNR-gamma loss weights (sd-scripts' --min_snr_gamma; 5 is the paper's and the common
    # choice): without them the nearly-clean timesteps dominate the loss (see
    # sd_lora.objective.min_snr_weights). 0: unweighted.
    min_snr_gamma: float = 0.0
    # Zero terminal SNR (Lin et al. 2023; sd-scripts' zero_terminal_snr): betas rescaled so the
    # last timestep is pure noise, with "trailing" timesteps for sampling; the run's sample
    # images and report use it too, and the file says so (ss_zero_terminal_snr). Mostly for
    # v-prediction bases; generate with the same scheduler settings.
    zero_terminal_snr: bool = False
    # SD3 (rectified flow) only: how training draws its noise levels sigma in (0, 1) before
    # the shift (see sd_lora.objective.flow). logit_normal: sigmoid of N(logit_mean,
    # logit_std), the SD3 paper's choice; mode: mode_scale bends a uniform draw towards one
    # end; uniform. flow_shift > 0 replaces the base scheduler's shift (SD3: 3.0); a larger
    # shift spends more steps at high noise.
    timestep_sampling: TimestepSampling = "logit_normal"
    logit_mean: float = 0.0  # SD3: the mean of logit_normal's normal draw
    logit_std: float = 1.0  # SD3: the spread of logit_normal's normal draw
    mode_scale: float = 1.29  # SD3: how far "mode" bends the draw (0: uniform)
    flow_shift: float = 0.0  # SD3: the noise-level shift; 0: the base scheduler's (SD3: 3.0)
    # With held-out images (data.validation_path or data.validation_split): their denoising loss
    # at fixed timesteps and noise every validation_every steps and at the end, in
    # validation.csv and TensorBoard; the adapter at the best value is written as
    # <name>-best.safetensors. early_stopping_patience: stop after that many validations
    # without a new best (0: never).
    validation_every: int = 50
    early_stopping_patience: int = 0  # validations without a new best before stopping; 0: never
    # The first training images that the fixed before-and-after loss (the console's last lines,
    # summary.json) is measured on, at 5 timesteps each. -1: sized to the run, at most 4, so
    # that it costs under a tenth of the training (a run of a few steps on a large base skips
    # it); 0: off.
    eval_images: int = -1
    # An exponential moving average of the adapter's weights (e.g. 0.999; 0: off): exported as
    # <name>.safetensors (and used by the final evaluation and report), the raw last weights
    # as <name>-raw.safetensors. See sd_lora.train.ema.
    ema_decay: float = 0.0
    mixed_precision: MixedPrecision = "no"  # bf16 / fp16 autocast (fp16 needs CUDA), the frozen base in that dtype; LoRA weights stay fp32
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    seed: int = 0  # LoRA initialisation, data order, flips, crops and noise all follow it
    checkpoint_every: int = 100  # optimizer steps; 0 disables intermediate checkpoints
    checkpoints_keep: int = 2  # the newest N are kept; 0 keeps all
    dataloader_workers: int = 0  # image-loading worker processes; 0 loads in the training process


@dataclass(frozen=True)
class SampleConfig:
    # false: no sample images at all (neither every sample.every steps nor at the end), for
    # runs timed against trainers that render none; the quality report renders its own.
    enabled: bool = True
    prompts: tuple[str, ...] = ()  # empty: the first three distinct captions of the dataset
    seeds: tuple[int, ...] = ()  # empty: 0, 1, 2, ...
    every: int = 100  # optimizer steps; 0: only at the end
    steps: int = 20  # sampling steps of each sample image
    guidance_scale: float = 7.0  # classifier-free guidance of the sample images
    negative_prompt: str = ""  # negative prompt of the sample images


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[ExportFormat, ...] = ("kohya",)  # `kohya` (A1111, ComfyUI, InvokeAI, sd-scripts) and/or `diffusers` (PEFT)
    dtype: ExportDtype = "fp16"  # tensor dtype of the exported adapter (alphas are always fp32)
    comment: str = ""  # ss_training_comment


@dataclass(frozen=True)
class ReportConfig:
    """The quality report written after training (report.json, report.png)."""

    enabled: bool = True  # write report.json and report.png after training
    # Images in the style that training did not see (a folder with captions, like data.path).
    # "": `heldout/<data folder name>` beside the data folder if it exists (datasets/toy/ is laid
    # out so), else a few training images, and the report says so.
    heldout: ReadPath = ""
    # Images NOT in the style, to measure how much the adapter leaks into other prompts.
    # "": `heldout/plain` beside the data folder if it exists, else the base model's own renders
    # of the training captions with the trigger word removed.
    off_style: ReadPath = ""
    # Whether an empty report.heldout / report.off_style looks for those folders beside the data
    # folder, as above; false: it does not (the app sets the folders it finds inside its own).
    look_beside_data: bool = True
    weights: tuple[float, ...] = (0.0, 0.5, 1.0)  # adapter weights in the before/after grid
    prompts: tuple[str, ...] = ()  # grid rows; empty: the sample prompts
    max_images: int = 16  # per loss measurement
    # Toy world only: the style whose score is measured on generations. "auto": the style whose
    # trigger word the captions carry; "none": no style score.
    style: str = "auto"


@dataclass(frozen=True)
class JobConfig:
    version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    """Defaults, then the TOML file (if any), then `section.field=value` overrides."""
    if path is None:
        return load_config_text("", overrides)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    return load_config_text(text, overrides, source=str(path))


def load_config_text(text: str, overrides: list[str] = (), source: str = "the config") -> JobConfig:
    """`load_config` on TOML text (the app's job editor); errors name `source`."""
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    for item in overrides:
        _set_dotted(raw, *parse_override(item))
    config = build(JobConfig, raw, "")
    validate(config)
    return config


def parse_override(item: str) -> tuple[str, Any]:
    """'train.learning_rate=2e-4' -> ('train.learning_rate', 0.0002); bare words are strings."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.field=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # an unquoted string such as train.name=demo
    return key.strip(), value


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    node = raw
    for part in sections:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part!r} is a value, not a section")
    node[leaf] = value


def build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass `cls` from a dict, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'{hint}"
            f"; known keys in {prefix.rstrip('.') or 'the top level'}: {', '.join(names)}"
        )
    values = {}
    for name in names:
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], prefix + name)
    return cls(**values)


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, dotted + ".")
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{dotted} = {value!r} is not allowed; use one of {get_args(hint)}")
        return value
    if origin is tuple:
        item_hint = get_args(hint)[0]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{dotted} must be a list, got {value!r}")
        return tuple(_coerce(item_hint, v, f"{dotted}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{dotted}: union types are not supported in config")  # pragma: no cover
    return _check_scalar(hint, value, dotted)


def _check_scalar(hint: type, value: Any, dotted: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        ok = False
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ConfigError(
            f"{dotted} must be {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


_POSITIVE = {
    "train.batch_size", "train.gradient_accumulation_steps",
    "train.lr_scheduler_num_cycles", "train.huber_c", "lora.unet_r", "lora.text_encoder_r", "lora.conv_r", "sample.steps",
    "report.max_images", "train.logit_std",
}
_NON_NEGATIVE = {
    "train.max_steps", "data.resolution", "train.lr_warmup_steps", "train.checkpoint_every",
    "train.checkpoints_keep", "train.dataloader_workers", "sample.every",
    "train.max_nonfinite_steps", "train.lr_scheduler_power", "data.keep_tokens",
    "train.max_grad_norm", "train.adam_weight_decay", "train.noise_offset",
    "train.min_snr_gamma", "data.regularization_weight", "data.min_bucket_reso",
    "data.max_bucket_reso", "train.validation_every", "train.early_stopping_patience",
    "train.loraplus_lr_ratio", "train.multires_noise_iterations", "train.multires_noise_discount",
    "train.mode_scale", "train.flow_shift",
}


def validate(config: JobConfig) -> None:
    """Range checks that types cannot express; each error names the field and value."""
    for dotted in sorted(_POSITIVE | _NON_NEGATIVE):
        section, name = dotted.split(".")
        value = getattr(getattr(config, section), name)
        if dotted in _POSITIVE and value <= 0:
            raise ConfigError(f"{dotted} = {value!r} must be positive")
        if value < 0:
            raise ConfigError(f"{dotted} = {value!r} must not be negative")
    low, high = LEARNING_RATE_RANGE.get(config.train.optimizer, DEFAULT_RANGE)
    for dotted in ("train.learning_rate", "train.text_encoder_learning_rate"):
        value = getattr(config.train, dotted.split(".")[1])
        if value != 0 and not low < value < high:  # 0: the base's recommendation
            hint = "1.0 for prodigy" if config.train.optimizer == "prodigy" else "e.g. 1e-4"
            raise ConfigError(f"{dotted} = {value!r} must be between {low:g} and {high:g} "
                              f"for train.optimizer = {config.train.optimizer!r} ({hint}; "
                              "0: the base's recommendation)")
    _check_optimizer_settings(config.train)
    if not 0 <= config.train.text_encoder_2_learning_rate < high:
        raise ConfigError(
            f"train.text_encoder_2_learning_rate = {config.train.text_encoder_2_learning_rate!r} "
            f"must be in [0, {high:g}) (0: the same as train.text_encoder_learning_rate)"
        )

    # else a traceback once the base has loaded. lora.unet_* set the denoiser's LoRA: SD3's
    # transformer has groups of its own, checked against the family once the base is known.
    denoiser_groups = {**TARGET_GROUPS["unet"], **TARGET_GROUPS["transformer"]}
    for component, known in (("unet", denoiser_groups), ("text_encoder", TARGET_GROUPS["text_encoder"])):
        groups = getattr(config.lora, f"{component}_targets")
        unknown = [g for g in groups if g not in known]
        if unknown:
            raise ConfigError(
                f"lora.{component}_targets = {list(groups)}: unknown group {unknown[0]!r}; choose "
                + (f"from {sorted(TARGET_GROUPS['unet'])} (UNet bases) or "
                   f"{sorted(TARGET_GROUPS['transformer'])} (SD3's transformer)"
                   if component == "unet" else f"from {sorted(known)}"))

    for dotted, kind in (("lora.rank_pattern", int), ("lora.alpha_pattern", float)):
        try:
            parse_patterns(getattr(config.lora, dotted.split(".")[1]), dotted, kind)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for name in ("dropout", "network_dropout", "rank_dropout", "module_dropout"):
        if not 0 <= getattr(config.lora, name) < 1:
            raise ConfigError(f"lora.{name} = {getattr(config.lora, name)!r} must be in [0, 1)")
    if config.lora.use_dora and (config.lora.rank_dropout or config.lora.module_dropout
                                 or config.lora.network_dropout):
        raise ConfigError(
            "lora.network_dropout, rank_dropout and module_dropout act on a plain LoRA's delta; "
            "with lora.use_dora the magnitudes rescale the whole weight, so they are not "
            "defined there: drop them or lora.use_dora (lora.dropout, on the input, works)"
        )
    if not 0 <= config.data.caption_dropout <= 1:
        raise ConfigError(f"data.caption_dropout = {config.data.caption_dropout!r} must be in [0, 1]")
    if not 0 <= config.data.regularization_caption_dropout <= 1:
        raise ConfigError(
            f"data.regularization_caption_dropout = {config.data.regularization_caption_dropout!r}"
            " must be in [0, 1] (a share of the regularization items)"
        )
    if config.data.regularization_caption_dropout and not config.data.regularization:
        raise ConfigError(
            "data.regularization_caption_dropout is set but data.regularization is empty; "
            "give a folder of regularization images or drop the setting"
        )
    if config.data.regularization_target != "noise" and not config.data.regularization:
        raise ConfigError(
            "data.regularization_target is set but data.regularization is empty; "
            "give a folder of regularization images or drop the setting"
        )
    if not 0 <= config.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay = {config.train.ema_decay!r} must be in [0, 1) "
                          "(e.g. 0.999; 0: no EMA)")
    if config.data.mask_path and not config.data.masked_loss:
        raise ConfigError("data.mask_path is set but data.masked_loss is false; set "
                          "data.masked_loss = true to use the masks")
    if config.train.adaptive_noise_scale and not config.train.noise_offset:
        raise ConfigError("train.adaptive_noise_scale needs train.noise_offset (it scales the "
                          "offset); set e.g. noise_offset = 0.05")
    if config.data.dataset_config and config.data.regularization:
        raise ConfigError("data.dataset_config and data.regularization are both set; put the "
                          "regularization folder in the dataset config as a subset with is_reg = true")
    if config.train.eval_images < -1:
        raise ConfigError(f"train.eval_images = {config.train.eval_images} must be -1 (sized to "
                          "the run), 0 (off) or a number of images")
    if not 0 <= config.data.validation_split < 1:
        raise ConfigError(f"data.validation_split = {config.data.validation_split!r} must be in "
                          "[0, 1) (a share of the images, e.g. 0.1)")
    if config.data.validation_split and config.data.validation_path:
        raise ConfigError("data.validation_split and data.validation_path are both set; "
                          "hold out images one way")
    if config.data.cache_latents in ("memory", "disk") and not config.data.center_crop:
        raise ConfigError(
            f"data.cache_latents = {config.data.cache_latents!r} needs data.center_crop = true: a "
            "random crop changes every epoch, so its latents cannot be cached"
        )
    if config.data.cache_text_encoder_outputs and config.lora.train_text_encoder:
        raise ConfigError(
            "data.cache_text_encoder_outputs needs lora.train_text_encoder = false: a text "
            "encoder that trains gives other outputs every step"
        )
    if config.data.bucket_reso_steps < 8 or config.data.bucket_reso_steps % 8:
        raise ConfigError(
            f"data.bucket_reso_steps = {config.data.bucket_reso_steps} must be a positive "
            "multiple of 8 (64 is usual; 8 for the 64 px toy and tiny bases)"
        )
    if config.data.resolution % 8:
        raise ConfigError(f"data.resolution = {config.data.resolution} must be a multiple of 8")
    if config.sample.seeds and len(config.sample.seeds) != len(config.sample.prompts):
        raise ConfigError(
            f"sample.seeds has {plural(len(config.sample.seeds), 'entry', 'entries')}; give one "
            "per prompt "
            f"({len(config.sample.prompts)}) or none"
        )
    if not config.report.weights:
        raise ConfigError("report.weights is empty; use e.g. [0.0, 0.5, 1.0]")
    if config.report.style not in REPORT_STYLES:
        raise ConfigError(
            f"report.style = {config.report.style!r}; use one of {list(REPORT_STYLES)}"
        )
    if not config.export.formats:
        raise ConfigError("export.formats is empty; use ['kohya'] and/or 'diffusers'")
    if config.version != CONFIG_VERSION:
        raise ConfigError(f"version = {config.version}; this sd-lora reads version {CONFIG_VERSION}")
    if any(c in config.train.name for c in "/\\:"):  # "": named after the data
        raise ConfigError(f"train.name = {config.train.name!r} must be a plain file name "
                          "(no '/', '\\' or ':'), or \"\" for the data folder's name")
    _check_seeds(config)


# numpy's seeds are 32-bit (accelerate's set_seed seeds numpy), as A1111's are.
MAX_SEED = 2**32 - 1


def _check_seeds(config: JobConfig) -> None:
    """train.seed and sample.seeds, checked here so that a bad one fails before any model loads
    (numpy would refuse it only after the base has loaded)."""
    seeds = [("train.seed", config.train.seed)] + [("sample.seeds", s) for s in config.sample.seeds]
    for dotted, seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{dotted} = {seed} must be from 0 to {MAX_SEED} (2**32 - 1)")


def _check_optimizer_settings(train: TrainConfig) -> None:
    """Adam's epsilon and betas, from train.adam_* or train.optimizer_args: out of range they
    make a finite gradient give a NaN update (eps = 0 divides 0 by 0 where a gradient is 0)."""
    try:
        args = parse_optimizer_args(train.optimizer_args)
    except UserError as e:
        raise ConfigError(str(e)) from None
    if not train.adam_epsilon > 0:  # (NaN too)
        raise ConfigError(f"train.adam_epsilon = {train.adam_epsilon!r} must be positive (e.g. "
                          "1e-8): Adam divides by sqrt(v) + epsilon, and v is 0 where a gradient is")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(train, name) < 1:
            raise ConfigError(f"train.{name} = {getattr(train, name)!r} must be in [0, 1) "
                              "(0.9 and 0.999 are usual)")
    if train.optimizer == "adafactor":  # its eps is a pair, its betas another thing
        return
    eps, betas = args.get("eps"), args.get("betas")
    if isinstance(eps, (int, float)) and not eps > 0:
        raise ConfigError(f"train.optimizer_args eps={eps!r} must be positive (e.g. 1e-8)")
    if isinstance(betas, (tuple, list)) and not all(
            isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"train.optimizer_args betas={betas!r}: each beta must be in [0, 1)")


def to_toml(config: JobConfig) -> str:
    """Serialise a config (for the run folder, so every run records what it did)."""
    lines = [f"version = {config.version}"]
    for section in dataclasses.fields(config):
        if section.name == "version":
            continue
        lines.append(f"\n[{section.name}]")
        for key, value in dataclasses.asdict(getattr(config, section.name)).items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


# Fields a resumed run may change: they decide how long it runs and what it writes, not what
# a step computes. Any other change would continue a run from a checkpoint made by another one
# (a learning rate the loaded schedule does not even use, other images at the same data
# position), so --resume refuses it and names the fields.
RESUMABLE_CHANGES = {
    "train.max_steps", "train.checkpoint_every", "train.checkpoints_keep",
    "train.dataloader_workers", "train.max_nonfinite_steps", "train.output_dir", "train.name",
    "train.validation_every", "train.early_stopping_patience", "train.eval_images",
    # Caches hold what would be computed anyway (the same up to float rounding).
    "data.cache_latents", "data.cache_dir", "data.cache_text_encoder_outputs",
}
RESUMABLE_SECTIONS = {"sample", "export", "report"}


def marked_fields(marker: Marker) -> list[str]:
    """The dotted names of the fields whose type carries `marker` (lists of such items too)."""
    found = []
    sections = get_type_hints(JobConfig)
    for section in dataclasses.fields(JobConfig):
        cls = sections[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        for name, hint in get_type_hints(cls, include_extras=True).items():
            if marker in _markers(hint):
                found.append(f"{section.name}.{name}")
    return found


def _markers(hint: Any) -> tuple:
    if get_origin(hint) is Annotated:
        return hint.__metadata__
    if get_origin(hint) is tuple:
        return tuple(m for arg in get_args(hint) if arg is not Ellipsis for m in _markers(arg))
    return ()


_PATH_FIELDS = set(marked_fields(READS) + marked_fields(WRITES) + marked_fields(BASE))


def flat_config(config: JobConfig) -> dict[str, Any]:
    """{"section.field": value} with JSON types (tuples as lists), as a checkpoint stores it."""
    flat = {}
    for section in dataclasses.fields(config):
        if section.name == "version":
            continue
        for key, value in dataclasses.asdict(getattr(config, section.name)).items():
            flat[f"{section.name}.{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def changes_refused_on_resume(saved: dict[str, Any], now: JobConfig) -> list[str]:
    """'field: saved -> now' for each field that differs from the checkpoint's config and that
    a resumed run may not change. Paths count as equal when they name the same file."""
    refused = []
    for dotted, value in flat_config(now).items():
        if dotted in RESUMABLE_CHANGES or dotted.split(".")[0] in RESUMABLE_SECTIONS:
            continue
        if dotted not in saved:  # a field added since the checkpoint was written
            continue
        old = saved[dotted]
        if old == value or (dotted in _PATH_FIELDS and _same_path(old, value)):
            continue
        refused.append(f"{dotted}: {old!r} -> {value!r}")
    return refused


def _same_path(a: Any, b: Any) -> bool:
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
