"""The training loop: a recipe of named steps on top of Accelerate.

    scan data -> load frozen base -> add LoRA -> optimizer/schedule -> (resume) -> loop -> export

Each step is a small function taking only the part of the config it needs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm import tqdm

from sd_lora.checkpoint import (
    WRITE_ERRORS,
    Progress,
    checkpoint_config,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_incomplete,
    save_checkpoint,
    write_failed,
)
from sd_lora.config import (
    DataConfig,
    JobConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    changes_refused_on_resume,
    flat_config,
    to_toml,
)
from sd_lora.data import DatasetScan, ImageCaptionDataset, Sample, load_image
from sd_lora.data.buckets import BucketBatchSampler, BucketSpec, bucket_info
from sd_lora.data.buckets import describe as describe_buckets
from sd_lora.data.latent_cache import CachedLatentDataset, LatentCache, vae_identity
from sd_lora.data.order import EpochSampler
from sd_lora.data.plan import check_job, regularization_layout
from sd_lora.data.scan import scan_dataset
from sd_lora.errors import UserError
from sd_lora.evaluate import eval_loss, make_eval_batch
from sd_lora.inject import add_lora, lora_parameters, lora_weight
from sd_lora.models import load_pipeline, model_family, prediction_type_of
from sd_lora.nonfinite import NonFiniteGuard, describe, gradients_finite
from sd_lora.objective import (
    add_noise_offset,
    denoising_loss,
    min_snr_weights,
    preserved_target,
    sample_noise,
    sample_timesteps,
    training_schedule,
)
from sd_lora.optimizers import build_optimizer, optimizer_class
from sd_lora.report import write_quality_report
from sd_lora.run_outputs import (
    RunLog,
    adapter_path,
    export_adapters,
    render_sample_grid,
    sample_prompts,
    write_summary,
)
from sd_lora.stop_signals import ImmediateStop, StopSignals
from sd_lora.text import EmbeddingCache, encode_all, text_encoders_of, tokenize_all, tokenizers_of
from sd_lora.validation import Validator, split_samples

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VALIDATION_MAX_IMAGES = 32  # x 5 timesteps per validation


class RunFolderError(UserError):
    """The output folder holds a run that this command would overwrite."""


@dataclass
class TrainResult:
    output_dir: Path
    adapter_files: dict[str, Path]
    eval_loss_before: float
    eval_loss_after: float
    steps: int
    seconds: float
    report: dict | None = None  # what report.json holds (None: report.enabled is false)


def train(config: JobConfig, *, resume: bool = False, show_progress: bool = True) -> TrainResult:
    output_dir = prepare_run_folder(config.train, resume)
    if resume and list_checkpoints(output_dir):
        check_resumable(list_checkpoints(output_dir)[-1], config)
    check = check_job(config)  # the base found and every image read before any model loads
    optimizer_class(config.train.optimizer)  # a missing optimizer package, before any model loads
    print(check.text())
    scan = check.data
    regularization = regularization_samples(config.data, scan, check.regularization)
    style, held_out = split_samples(style_samples(config.data, scan), config.data.validation_split,
                                    config.train.seed)
    if config.data.validation_path:
        held_out = scan_dataset(Path(config.data.validation_path),
                                caption_extensions=config.data.caption_extensions).samples
    accelerator = make_accelerator(config.train, output_dir)
    set_seed(config.train.seed)  # LoRA initialisation and dropout draw from the global RNG
    pipe = load_frozen_base(config.model, config.train.mixed_precision, accelerator.device)
    resolution = config.data.resolution or native_resolution(pipe)
    trained = add_adapters(pipe, config.lora)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(trained)
    optimizer = make_optimizer(trained, config.train)
    lr_scheduler = make_lr_scheduler(optimizer, config.train, accelerator.num_processes)
    dataset = make_dataset(style + regularization, resolution, config.data, config.train)
    if config.data.cache_latents != "none":  # each process its own (disk writes are atomic)
        dataset = cache_latents(dataset, pipe.vae, config.data, output_dir, accelerator.device,
                                show_progress)
    loader = make_loader(dataset, config.data, config.train)
    buckets = dataset_buckets(dataset, config.data)
    if buckets is not None:
        accelerator.print("Aspect-ratio buckets:\n" + describe_buckets(buckets))
    prepared = accelerator.prepare(*trained.values(), optimizer, loader, lr_scheduler)
    models = dict(zip(trained, prepared[: len(trained)]))
    optimizer, loader, lr_scheduler = prepared[len(trained) :]
    schedule = training_schedule(pipe.scheduler.config, prediction_type_of(pipe))
    noise_generator = torch.Generator().manual_seed(config.train.seed)
    progress = Progress(global_step=0, epoch=0, batches_done_in_epoch=0)
    if resume and list_checkpoints(output_dir):
        last = list_checkpoints(output_dir)[-1]
        progress = load_checkpoint(last, trained, optimizer, lr_scheduler, noise_generator)
        accelerator.print(f"resumed from {last} at step {progress.global_step}")
    eval_batch = make_eval_batch(*_eval_images(scan, resolution), pipe.vae, tokenizers_of(pipe))
    with _eval_mode(trained.values()):
        before = eval_loss(pipe.unet, text_encoders_of(pipe), schedule, eval_batch)
    write_run_records(output_dir, config, scan, accelerator)
    log = RunLog(output_dir, accelerator, resume=progress.global_step > 0)
    started = time.time()
    prompts = sample_prompts(config.sample, [s.caption for s in scan.samples])
    loop = TrainingLoop(config, accelerator, pipe, models, trained, optimizer, lr_scheduler,
                        schedule, noise_generator, log, output_dir, resolution, prompts)
    loop.latent_cache = getattr(dataset, "cache", None)
    loop.text_cache = EmbeddingCache() if config.data.cache_text_encoder_outputs else None
    if held_out:
        loop.validator = make_validator(loop, held_out, scan, buckets, started,
                                        resumed=progress.global_step > 0)
    progress = loop.run(loader, dataset, progress, show_progress)
    seconds = time.time() - started
    files: dict[str, Path] = {}
    report = None
    for model in trained.values():
        model.eval()  # training is over: no LoRA dropout in the last evaluation and samples
    after = eval_loss(pipe.unet, text_encoders_of(pipe), schedule, eval_batch)
    if accelerator.is_main_process:
        render_sample_grid(pipe, config.sample, prompts, resolution, output_dir / "samples" / "final.png")
        try:
            files = export_adapters(trained, model_family(pipe), prediction_type_of(pipe), config,
                                    scan, resolution, output_dir, started, buckets)
        except WRITE_ERRORS as e:  # the final checkpoint holds the trained adapter
            raise write_failed(output_dir / f"{config.train.name}.safetensors", e, output_dir) from e
        write_summary(output_dir, before, after, progress.global_step, seconds, files,
                      loop.guard.skipped, loop.validation_summary())
        log.plot()
        if config.report.enabled:
            report = write_quality_report(pipe, trained.values(), schedule, config, scan,
                                          resolution, output_dir)
    accelerator.end_training()
    return TrainResult(output_dir, files, before, after, progress.global_step, seconds, report)


def prepare_run_folder(cfg: TrainConfig, resume: bool) -> Path:
    """Create the output folder; refuse to start over on top of a run's checkpoints."""
    output_dir = Path(cfg.output_dir)
    existing = list_checkpoints(output_dir)
    if existing and not resume:
        raise RunFolderError(
            f"{output_dir} already holds {existing[-1].name}; pass --resume to continue that run, "
            "or choose another --output (nothing was changed)"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_incomplete(output_dir):
        print(f"removed {stale.name}: a checkpoint whose save was interrupted (never complete)")
    return output_dir


def check_resumable(checkpoint: Path, config: JobConfig) -> None:
    """Refuse, before anything loads, to resume a checkpoint with settings that change what a
    step computes (see config.RESUMABLE_CHANGES)."""
    saved = checkpoint_config(checkpoint)
    if saved is None:
        return
    refused = changes_refused_on_resume(saved, config)
    if refused:
        raise RunFolderError(
            f"{checkpoint} was made with other settings: " + "; ".join(refused) + ". Resuming "
            "would mix two runs. Put these back to continue it (a resumed run may change only "
            "how long it runs and what it writes: train.max_steps, checkpoints, sample.*, "
            "export.*, report.*), or train the new settings into another --output."
        )


def write_run_records(output_dir: Path, config: JobConfig, scan: DatasetScan, accelerator) -> None:
    """The run's config, dataset report and logs. Written only once the base has loaded and the
    data has scanned, so a start that fails on bad input changes nothing in the folder."""
    if accelerator.is_main_process:
        (output_dir / "config.toml").write_text(to_toml(config), encoding="utf-8")
        (output_dir / "dataset_report.txt").write_text(scan.report() + "\n", encoding="utf-8")
    accelerator.init_trackers("logs")


def make_accelerator(cfg: TrainConfig, output_dir: Path) -> Accelerator:
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError(
            "train.mixed_precision = 'fp16' needs a CUDA GPU (on a CPU it would silently run in "
            "fp32); use 'bf16' or 'no' here"
        )
    # Accelerate keeps one precision per process; a second run in the same process (notebook,
    # app, tests) may ask for another. The distributed (partial) state is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=str(output_dir),
    )
    return accelerator


def load_frozen_base(cfg: ModelConfig, mixed_precision: str, device: torch.device):
    prediction_type = None if cfg.prediction_type == "auto" else cfg.prediction_type
    pipe = load_pipeline(cfg.base, dtype=WEIGHT_DTYPES[mixed_precision],
                         prediction_type=prediction_type, allow_pickle=cfg.allow_pickle)
    if pipe.vae.dtype != torch.float32:  # encoding in fp32 costs little and avoids fp16 overflow
        pipe.vae.to(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def native_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def add_adapters(pipe, cfg: LoraConfig) -> dict[str, torch.nn.Module]:
    """Inject LoRA; returns the models that train, keyed by component."""
    add_lora(pipe.unet, "unet", cfg.unet_targets, cfg.unet_r, cfg.unet_alpha, cfg.dropout)
    trained = {"unet": pipe.unet}
    if not cfg.train_text_encoder:
        return trained
    encoders = ["text_encoder"]
    if getattr(pipe, "text_encoder_2", None) is not None and cfg.train_text_encoder_2:
        encoders.append("text_encoder_2")
    for name in encoders:
        add_lora(getattr(pipe, name), name, cfg.text_encoder_targets,
                 cfg.text_encoder_r, cfg.text_encoder_alpha, cfg.dropout)
        trained[name] = getattr(pipe, name)
    return trained


def enable_gradient_checkpointing(trained: dict[str, torch.nn.Module]) -> None:
    """Recompute activations in the backward pass: less memory, ~30% more time per step."""
    for name, model in trained.items():
        if name == "unet":
            model.enable_gradient_checkpointing()
        else:  # transformers; non-reentrant so frozen inputs still pass gradients to LoRA
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def make_optimizer(trained: dict[str, torch.nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    """train.optimizer over one parameter group per trained model, each with its learning rate."""
    lrs = {"unet": cfg.learning_rate, "text_encoder": cfg.text_encoder_learning_rate,
           "text_encoder_2": cfg.text_encoder_2_learning_rate or cfg.text_encoder_learning_rate}
    groups = [{"params": lora_parameters(m), "lr": lrs[name]} for name, m in trained.items()]
    return build_optimizer(groups, cfg)


def make_lr_scheduler(optimizer, cfg: TrainConfig, num_processes: int):
    # Accelerate steps a prepared scheduler once per process, hence the scaling. diffusers'
    # "constant" ignores warmup steps without a word; "constant_with_warmup" honours them.
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps else cfg.lr_scheduler
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * num_processes,
        num_training_steps=cfg.max_steps * num_processes,
        num_cycles=cfg.lr_scheduler_num_cycles,
        power=cfg.lr_scheduler_power,
    )


def style_samples(cfg: DataConfig, scan: DatasetScan) -> list[Sample]:
    """The dataset's samples, with the caption dropout asked for (data.caption_dropout)."""
    return [replace(s, caption_dropout=cfg.caption_dropout) for s in scan.samples]


def regularization_samples(cfg: DataConfig, scan: DatasetScan,
                           reg: DatasetScan | None) -> list[Sample]:
    """The regularization images, repeated (or cut) to about as many items per epoch as the
    style's (see data.plan.regularization_layout)."""
    if reg is None:
        return []
    repeats, count = regularization_layout(scan.num_train_items, reg.num_images)
    return [replace(s, repeats=repeats, subset="regularization",
                    loss_weight=cfg.regularization_weight,
                    caption_dropout=cfg.regularization_caption_dropout,
                    preserve=cfg.regularization_target == "base") for s in reg.samples[:count]]


def bucket_spec(data: DataConfig, resolution: int) -> BucketSpec | None:
    """The bucketing of data.enable_bucket at this resolution; None without bucketing."""
    if not data.enable_bucket:
        return None
    try:
        return BucketSpec(resolution, data.bucket_reso_steps,
                          data.min_bucket_reso or resolution // 2,
                          data.max_bucket_reso or resolution * 2, data.bucket_no_upscale)
    except ValueError as e:
        raise UserError(f"data.enable_bucket at {resolution} px: {e}; set data.bucket_reso_steps, "
                        "data.min_bucket_reso and data.max_bucket_reso to fit") from None


def make_dataloader(samples: list[Sample], resolution: int, data: DataConfig, cfg: TrainConfig):
    dataset = make_dataset(samples, resolution, data, cfg)
    return dataset, make_loader(dataset, data, cfg)


def make_dataset(samples: list[Sample], resolution: int, data: DataConfig,
                 cfg: TrainConfig) -> ImageCaptionDataset:
    return ImageCaptionDataset(
        samples, resolution, center_crop=data.center_crop,
        random_flip=data.random_flip, seed=cfg.seed,
        shuffle_tags=data.shuffle_tags, keep_tokens=data.keep_tokens,
        buckets=bucket_spec(data, resolution),
    )


def cache_latents(dataset: ImageCaptionDataset, vae, data: DataConfig, output_dir: Path,
                  device, show_progress: bool) -> CachedLatentDataset:
    """data.cache_latents: every image variant encoded once (or read from the disk cache)."""
    folder = None
    if data.cache_latents == "disk":
        folder = Path(data.cache_dir) if data.cache_dir else output_dir / "latent-cache"
    cached = CachedLatentDataset(dataset, LatentCache(folder), vae_identity(vae))

    @torch.no_grad()
    def encode(pixels: torch.Tensor):
        posterior = vae.encode(pixels.to(device, torch.float32)).latent_dist
        return posterior.mean, posterior.std

    encoded = cached.fill(encode, show_progress=show_progress)
    print(f"latent cache ({data.cache_latents}{f', {folder}' if folder else ''}): "
          f"{len(cached.variants())} image variants, {encoded} encoded now")
    return cached


def make_loader(dataset, data: DataConfig, cfg: TrainConfig):
    # Its own generator: each new iterator draws a worker seed, which would otherwise shift
    # the global RNG (LoRA dropout) and make a resumed run diverge.
    generator = torch.Generator().manual_seed(cfg.seed)
    if data.enable_bucket:
        batches = BucketBatchSampler(dataset.sizes, cfg.batch_size, seed=cfg.seed)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, generator=generator,
                                           num_workers=cfg.dataloader_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=EpochSampler(len(dataset), seed=cfg.seed),
        num_workers=cfg.dataloader_workers, drop_last=len(dataset) >= cfg.batch_size,
        generator=generator,
    )


def dataset_buckets(dataset: ImageCaptionDataset, data: DataConfig) -> dict | None:
    """ss_bucket_info of the dataset's images (each once, not per repeat); None unbucketed."""
    if not data.enable_bucket:
        return None
    first = {}
    for item, size in zip(dataset.items, dataset.sizes):
        first.setdefault(item.image, (item.size, size))
    return bucket_info([s for s, _ in first.values()], [b for _, b in first.values()])


def make_validator(loop, held_out: list[Sample], scan: DatasetScan, buckets, started: float,
                   resumed: bool) -> Validator:
    """Validation on the held-out images; the best adapter exported as <name>-best."""
    config, pipe = loop.config, loop.pipe
    samples = held_out[:VALIDATION_MAX_IMAGES]
    pixels = torch.stack([load_image(s.image, loop.resolution, center_crop=True) for s in samples])
    batch = make_eval_batch(pixels, [s.caption for s in samples], pipe.vae, tokenizers_of(pipe))
    best_config = replace(config, train=replace(config.train, name=f"{config.train.name}-best"))

    def measure() -> float:
        with _eval_mode(loop.trained.values()):
            return eval_loss(pipe.unet, text_encoders_of(pipe), loop.schedule, batch)

    def export_best(step: int) -> None:
        if loop.accelerator.is_main_process:
            export_adapters(loop.trained, model_family(pipe), prediction_type_of(pipe), best_config,
                            scan, loop.resolution, loop.output_dir, started, buckets)

    print(f"validation: {len(samples)} held-out images, every {config.train.validation_every} steps"
          + (f", early stop after {config.train.early_stopping_patience} without a new best"
             if config.train.early_stopping_patience else ""))
    return Validator(measure, config.train.validation_every, config.train.early_stopping_patience,
                     loop.output_dir, export_best, resumed)


def _eval_images(scan: DatasetScan, resolution: int, count: int = 4):
    """The first `count` images of the dataset at their center crop, with their captions."""
    samples = scan.samples[:count]
    pixels = torch.stack([load_image(s.image, resolution, center_crop=True) for s in samples])
    return pixels, [s.caption for s in samples]


class TrainingLoop:
    """Runs optimizer steps until max_steps, checkpointing and sampling on the way."""

    def __init__(self, config, accelerator, pipe, models, trained, optimizer, lr_scheduler,
                 schedule, noise_generator, log, output_dir, resolution, prompts):
        self.config, self.accelerator, self.pipe = config, accelerator, pipe
        self.models, self.trained = models, trained
        self.optimizer, self.lr_scheduler, self.schedule = optimizer, lr_scheduler, schedule
        self.noise_generator, self.log = noise_generator, log
        self.output_dir, self.resolution, self.prompts = output_dir, resolution, prompts
        train = config.train if config is not None else None
        self.guard = NonFiniteGuard(train.max_nonfinite_steps if train else 0,
                                    train.mixed_precision if train else "no",
                                    train.learning_rate if train else 0.0)
        self.window_bad_loss = None  # the first NaN/inf loss of the current accumulation
        self.problem = ""
        self.latent_cache = None  # data.latent_cache.LatentCache when data.cache_latents is on
        self.text_cache = None  # text.EmbeddingCache when data.cache_text_encoder_outputs is on
        self.validator: Validator | None = None  # with held-out images
        self.stopped_early = False

    def run(self, loader, dataset, progress: Progress, show_progress: bool) -> Progress:
        cfg = self.config.train
        bar = tqdm(total=cfg.max_steps, initial=progress.global_step, desc="training",
                   unit="step", disable=not (show_progress and self.accelerator.is_main_process))
        step, epoch, skip = progress.global_step, progress.epoch, progress.batches_done_in_epoch
        done_in_epoch = skip
        for model in self.models.values():
            model.train()
        try:
            with StopSignals() as stop:
                while step < cfg.max_steps:
                    loader.set_epoch(epoch)  # sets the sampler's epoch (and Accelerate's counter)
                    dataset.set_epoch(epoch)
                    batches = self.accelerator.skip_first_batches(loader, skip) if skip else loader
                    done_in_epoch = skip
                    for batch in batches:
                        loss, applied = self.train_micro_batch(batch)
                        done_in_epoch += 1
                        if not self.accelerator.sync_gradients:
                            continue
                        if applied:
                            step += 1
                            self.guard.good()
                            bar.update(1)
                            bar.set_postfix(loss=f"{loss:.4f}",
                                            lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
                            self.log.step(step, loss, self.lr_scheduler.get_last_lr()[0], epoch)
                            self.after_step(Progress(step, epoch, done_in_epoch))
                        else:  # nothing changed; raises when it keeps happening
                            self.guard.bad(step + 1, loss, self.problem)
                            bar.set_postfix(loss=f"{loss:.4f}", skipped=self.guard.skipped)
                        if stop.requested:  # between two optimizer steps: a consistent state
                            raise KeyboardInterrupt
                        if step >= cfg.max_steps or self.stopped_early:
                            break
                    else:
                        epoch, skip = epoch + 1, 0
                        continue
                    break
        except ImmediateStop:  # a second interrupt: the last complete checkpoint stands
            bar.close()
            raise
        except KeyboardInterrupt:
            # Ctrl-C / SIGTERM: keep what was learned, then stop.
            self.save(Progress(step, epoch, done_in_epoch))
            bar.close()
            raise
        bar.close()
        final = Progress(step, epoch, done_in_epoch)
        self.save(final)
        return final

    def train_micro_batch(self, batch) -> float:
        accelerator = self.accelerator
        unet = self.models["unet"]
        with accelerator.accumulate(*self.models.values()):
            latents = self.latents_of(batch)
            noise = sample_noise(latents, self.noise_generator)
            noise = add_noise_offset(noise, self.config.train.noise_offset, self.noise_generator)
            timesteps = sample_timesteps(latents.shape[0], self.schedule.config.num_train_timesteps,
                                         self.noise_generator)
            input_ids = tokenize_all(tokenizers_of(self.pipe), batch["caption"]).to(accelerator.device)
            if self.text_cache is not None:  # the encoders are frozen (the config checks)
                embeddings = self.text_cache.conditioning(
                    tokenizers_of(self.pipe), text_encoders_of(self.pipe), list(batch["caption"]),
                    batch.get("time_ids"), accelerator.device)
            else:
                with torch.set_grad_enabled(len(self.models) > 1):  # a text encoder trains
                    embeddings = self.encode(input_ids, batch.get("time_ids"))
            weights = batch["loss_weight"].to(accelerator.device, torch.float32)
            if self.config.train.min_snr_gamma:
                weights = weights * min_snr_weights(self.schedule, timesteps,
                                                    self.config.train.min_snr_gamma)
            wanted = self.preserved_targets(batch, latents, noise, timesteps, input_ids,
                                            embeddings)
            loss = denoising_loss(unet, self.schedule, latents, embeddings, noise, timesteps,
                                  weights, wanted, self.config.train.loss, self.config.train.huber_c)
            accelerator.backward(loss)
            loss_value = float(accelerator.gather(loss.detach()).mean())  # NaN if any process's is
            if not math.isfinite(loss_value) and self.window_bad_loss is None:
                self.window_bad_loss = loss_value
            applied = True
            if accelerator.sync_gradients:
                params = [p for m in self.trained.values() for p in lora_parameters(m)]
                # Under fp16 the loss scaler skips inf gradients itself; otherwise we do.
                grads_ok = accelerator.scaler is not None or gradients_finite(params)
                applied = self.window_bad_loss is None and grads_ok
                if not applied:
                    self.problem = describe(self.window_bad_loss, grads_ok)
                self.window_bad_loss = None
                if applied:
                    if self.config.train.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, self.config.train.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss_value, applied

    def preserved_targets(self, batch, latents, noise, timesteps, input_ids, embeddings=None):
        """Targets with the base's own predictions for the batch's `preserve` items
        (data.regularization_target = "base"); None when there are none, so the loss uses the
        noise as usual. With frozen text encoders `embeddings` are the base's already."""
        preserve = batch["preserve"]
        if not bool(preserve.any()):
            return None
        unet = self.models["unet"]
        with torch.no_grad(), lora_weight(self.trained.values(), 0.0):
            frozen = len(self.models) == 1 and embeddings is not None
            base_embeddings = embeddings if frozen else self.encode(input_ids, batch.get("time_ids"))
            return preserved_target(unet, self.schedule, latents, base_embeddings, noise,
                                    timesteps, preserve)

    def encode(self, input_ids: torch.Tensor, time_ids: torch.Tensor | None):
        """Token ids (B, E, 77) -> the UNet's conditioning, through the encoders that train
        (Accelerate-prepared) and the frozen ones; `time_ids` (B, 6) is SDXL's (see data.dataset)."""
        encoders = text_encoders_of(self.pipe, self.models)
        if time_ids is not None:
            time_ids = time_ids.to(self.accelerator.device)
        return encode_all(encoders, input_ids, time_ids)

    @torch.no_grad()
    def latents_of(self, batch: dict) -> torch.Tensor:
        """The batch's scaled latents, sampled from the VAE posterior: encoded now from
        `pixel_values`, or (data.cache_latents) the cached posteriors of `cache_key`."""
        if "cache_key" not in batch:
            return self.encode_images(batch["pixel_values"])
        device = self.accelerator.device
        entries = [self.latent_cache.entries[key] for key in batch["cache_key"]]
        mean = torch.stack([m for m, _ in entries]).to(device)
        std = torch.stack([s for _, s in entries]).to(device)
        return self._sample_latents(mean, std)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) scaled latents, sampled from the VAE."""
        pixels = pixel_values.to(self.accelerator.device, torch.float32)
        posterior = self.pipe.vae.encode(pixels).latent_dist
        return self._sample_latents(posterior.mean, posterior.std)

    def _sample_latents(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        latents = mean + std * sample_noise(mean, self.noise_generator)
        unet_dtype = next(self.pipe.unet.parameters()).dtype
        return (latents * self.pipe.vae.config.scaling_factor).to(unet_dtype)

    def after_step(self, progress: Progress) -> None:
        cfg, sample = self.config.train, self.config.sample
        step = progress.global_step
        if self.validator is not None and self.validator.due(step, step >= cfg.max_steps):
            loss, self.stopped_early = self.validator.validate(step)
            self.accelerator.log({"validation/loss": loss}, step=step)
            if self.stopped_early:
                state = self.validator.state
                self.accelerator.print(
                    f"early stop at step {step}: {state.since_best} validations without a new best "
                    f"(best {state.best_loss:.4f} at step {state.best_step})")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            self.save(progress)
        if sample.every and step % sample.every == 0 and step < cfg.max_steps:
            if self.accelerator.is_main_process:
                path = self.output_dir / "samples" / f"step-{step:06d}.png"
                with _eval_mode(self.models.values()):
                    render_sample_grid(self.pipe, sample, self.prompts, self.resolution, path)

    def validation_summary(self) -> dict | None:
        if self.validator is None:
            return None
        state, name = self.validator.state, f"{self.config.train.name}-best"
        paths = {fmt: adapter_path(self.output_dir, name, fmt) for fmt in self.config.export.formats}
        return {"best_loss": state.best_loss, "best_step": state.best_step,  # (written before a resume too)
                "best_adapters": {fmt: str(p) for fmt, p in paths.items() if p.is_file()},
                "stopped_early": self.stopped_early}

    def save(self, progress: Progress) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            folder = checkpoint_path(self.output_dir, progress.global_step)
            try:
                save_checkpoint(folder, self.trained, self.optimizer, self.lr_scheduler, progress,
                                self.noise_generator, flat_config(self.config))
            except WRITE_ERRORS as e:  # the older checkpoints are untouched: prune runs after
                raise write_failed(folder, e, self.output_dir) from e
            prune_checkpoints(self.output_dir, self.config.train.checkpoints_keep)
        self.accelerator.wait_for_everyone()


class _eval_mode:
    """Evaluate or sample without dropout, then put each model back in the mode it was in."""

    def __init__(self, models):
        self.models = list(models)

    def __enter__(self):
        self.was_training = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc):
        for m, training in zip(self.models, self.was_training):
            m.train(training)

