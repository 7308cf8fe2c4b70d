"""A training run, start to finish: `train(config)` as a recipe of named steps on Accelerate.

    scan data -> load frozen base -> add LoRA -> optimizer/schedule -> (resume) -> loop -> export

Each step is a small function taking only the part of the config it needs; the optimizer steps
themselves are `sd_lora.train.loop`'s.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler

from sd_lora.adapters.run_folder import checkpoint_config
from sd_lora.choices import parse_patterns
from sd_lora.config import (
    JobConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    changes_refused_on_resume,
    to_toml,
)
from sd_lora.data import DatasetScan, Sample
from sd_lora.data.buckets import describe as describe_buckets
from sd_lora.data.loader import (
    cache_latents,
    centre_crop_batch,
    dataset_buckets,
    eval_images,
    latent_cache_mode,
    make_dataset,
    make_loader,
    regularization_samples,
    style_samples,
)
from sd_lora.data.scan import scan_dataset
from sd_lora.errors import UserError
from sd_lora.lora.dropouts import AdapterDropouts, add_dropouts
from sd_lora.lora.inject import add_lora, lora_named_parameters, pattern_matches
from sd_lora.models.families import (
    FLOW,
    denoiser_name,
    denoiser_of,
    model_family,
    model_variant,
    native_resolution,
    prediction_type_of,
)
from sd_lora.models.load import load_pipeline
from sd_lora.models.text import EmbeddingCache, text_encoders_of, tokenizers_of
from sd_lora.objective import Objective, training_schedule, zero_terminal_snr_scheduler
from sd_lora.train.checkpoint import (
    WRITE_ERRORS,
    Progress,
    list_checkpoints,
    load_checkpoint,
    load_extra,
    named_trainable,
    remove_incomplete,
    write_failed,
)
from sd_lora.train.ema import AdapterEMA
from sd_lora.train.evaluate import (
    EVAL_TIMESTEPS,
    EvalBatch,
    eval_chunks,
    eval_loss,
    make_eval_batch,
)
from sd_lora.train.loop import RunSetup, Trainee, TrainingLoop, eval_mode
from sd_lora.train.optimizers import build_optimizer, optimizer_class
from sd_lora.train.outputs import (
    RunLog,
    adapter_path,
    export_adapters,
    render_sample_grid,
    sample_prompts,
    write_summary,
)
from sd_lora.train.preflight import check_for_family, check_job, with_dataset_config
from sd_lora.train.recommended import with_recommended
from sd_lora.train.report import StyleScorer, write_quality_report
from sd_lora.train.run_names import with_run_names
from sd_lora.train.timing import timing_line, timing_record, write_timing
from sd_lora.train.validation import Validator, split_samples
from sd_lora.util.dtypes import weight_dtype
from sd_lora.util.phases import PhaseClock, phase
from sd_lora.util.processes import is_main_process, say
from sd_lora.util.words import plural

VALIDATION_MAX_IMAGES = 32  # x 5 timesteps per validation


class RunFolderError(UserError):
    """The output folder holds a run that this command would overwrite."""


@dataclass
class TrainResult:
    output_dir: Path
    adapter_files: dict[str, Path]
    eval_loss_before: float | None  # None: no evaluation (train.eval_images)
    eval_loss_after: float | None
    steps: int
    seconds: float
    report: dict | None = None  # what report.json holds (None: report.enabled is false)
    eval_images: int = 0  # the training images (not held out) the evaluation loss is on


def train(config: JobConfig, *, resume: bool = False, show_progress: bool = True,
          style_scorer: StyleScorer | None = None) -> TrainResult:
    """Train, export and report as `config` says. `style_scorer`: how the quality report scores
    the style in its renders (the CLI and the app pass the toy world's); None: no style score."""
    config = with_dataset_config(config)  # an sd-scripts dataset TOML's settings, if one is given
    config = with_recommended(config)  # learning rates and steps left at 0: the base's own
    config = with_run_names(config, resume)  # train.output_dir and name left "": from the data
    with removed_if_left_empty(Path(config.train.output_dir)), PhaseClock() as clock:
        return _train(config, resume, show_progress, style_scorer, clock)


def _train(config: JobConfig, resume: bool, show_progress: bool,
           style_scorer: StyleScorer | None, clock: PhaseClock) -> TrainResult:
    output_dir = prepare_run_folder(config.train, resume)
    if resume and list_checkpoints(output_dir):
        check_resumable(list_checkpoints(output_dir)[-1], config)
    check = check_job(config)  # the base found and every image read before any model loads
    optimizer_class(config.train.optimizer)  # a missing optimizer package, before any model loads
    say(check.text())
    training_samples, held_out = select_samples(config, check)
    accelerator = make_accelerator(config.train, output_dir)
    set_seed(config.train.seed)  # LoRA initialisation and dropout draw from the global RNG
    pipe = load_training_base(config, accelerator, show_progress)
    check_for_family(config, model_family(pipe))  # what the name alone could not tell
    resolution = config.data.resolution or native_resolution(pipe)
    check, small = check.at_native_size(resolution)
    if small:
        say(f"Warnings at the base's native size, {resolution} px ({len(small)}):\n"
            + "\n".join(f"  {w.path}: {w.reason}" for w in small))
    scan = replace(check.data, regularization_items=check.items_per_epoch() - check.data.num_train_items)
    trained = add_adapters(pipe, config.lora)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(trained)
    optimizer = make_optimizer(trained, config.train)
    lr_scheduler = make_lr_scheduler(optimizer, config.train, accelerator.num_processes)
    dataset = make_dataset(training_samples, resolution, config.data, config.train)
    cache_mode = latent_cache_mode(config.data, dataset, resolution,
                                   pipe.vae.config.latent_channels, pipe.vae_scale_factor)
    if cache_mode != "none":  # each process its own (disk writes are atomic)
        dataset = cache_latents(dataset, pipe.vae, config.data, output_dir, show_progress,
                                cache_mode)
    loader = make_loader(dataset, config.data, config.train, accelerator.num_processes)
    buckets = dataset_buckets(dataset, config.data)
    if buckets is not None:
        accelerator.print("Aspect-ratio buckets:\n" + describe_buckets(buckets))
    prepared = accelerator.prepare(*trained.values(), optimizer, loader, lr_scheduler)
    models = dict(zip(trained, prepared[: len(trained)]))
    optimizer, loader, lr_scheduler = prepared[len(trained) :]
    objective = Objective.from_config(config.train, training_schedule(
        pipe.scheduler.config, prediction_type_of(pipe), config.train.flow_shift))
    schedule = objective.schedule
    noise_generator = torch.Generator().manual_seed(config.train.seed)
    progress = Progress(global_step=0, epoch=0, batches_done_in_epoch=0)
    ema = AdapterEMA(named_trainable(trained), config.train.ema_decay) if config.train.ema_decay else None
    if resume and list_checkpoints(output_dir):
        last = list_checkpoints(output_dir)[-1]
        progress = load_checkpoint(last, trained, optimizer, lr_scheduler, noise_generator)
        if ema is not None:
            ema.load(load_extra(last))
        accelerator.print(f"resumed from {last} at step {progress.global_step}")
    eval_batch = None
    if (count := eval_image_count(config.train)) > 0:
        eval_batch = make_eval_batch(*eval_images(scan, resolution, count), pipe.vae,
                                     tokenizers_of(pipe))
    else:
        say(f"evaluation: skipped ({eval_skipped(config.train)})")
    with eval_mode(trained.values()):
        before = measured_eval_loss(pipe, schedule, eval_batch, "before training", show_progress)
    write_run_records(output_dir, config, scan, accelerator)
    log = RunLog(output_dir, accelerator, resumed_at=progress.global_step)
    started = time.time()
    prompts = sample_prompts(config.sample, [s.caption for s in scan.samples])
    trainee = Trainee(pipe, trained, models, optimizer, lr_scheduler, ema)
    setup = RunSetup(config, accelerator, objective, noise_generator, resolution, prompts,
                     output_dir, log,
                     EmbeddingCache() if config.data.cache_text_encoder_outputs else None)
    validator = (make_validator(trainee, setup, held_out, scan, buckets, started,
                                resumed=progress.global_step > 0) if held_out else None)
    loop = TrainingLoop(trainee, setup, validator)
    with phase("training", training_steps(progress.global_step, config.train.max_steps),
               bar=False):  # the loop has its own bar
        progress = loop.run(loader, dataset, progress, show_progress)
    return finish_run(loop, progress, time.time() - started, scan, buckets, eval_batch, before,
                      started, show_progress, style_scorer, clock)


def training_steps(done: int, steps: int) -> str:
    """'300 steps', or 'steps 101 to 300' when a resumed run continues."""
    return f"steps {done + 1} to {steps}" if done else plural(steps, "step")


EVAL_MAX_IMAGES = 4
EVAL_SHARE = 0.1  # train.eval_images = -1: the evaluation's forward passes, at most, per the run's


def eval_image_count(cfg: TrainConfig) -> int:
    """train.eval_images, or (-1) as many as keep the before-and-after evaluation under
    EVAL_SHARE of the run's compute (a training step costs about 3 forward passes per image,
    forward and backward; each evaluated image 2 x 5), at most EVAL_MAX_IMAGES. From
    train.max_steps, not the steps left, so that a resumed run measures as an uninterrupted one."""
    if cfg.eval_images >= 0:
        return cfg.eval_images
    passes = 3 * cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps
    return int(min(EVAL_MAX_IMAGES, EVAL_SHARE * passes // (2 * len(EVAL_TIMESTEPS))))


def eval_skipped(cfg: TrainConfig) -> str:
    if cfg.eval_images == 0:
        return "train.eval_images = 0"
    return (f"{plural(cfg.max_steps, 'step')} of {plural(cfg.batch_size, 'image')}: a before-and-"
            "after loss would cost more than a tenth of the run; set train.eval_images to "
            "measure it anyway")


def measured_eval_loss(pipe, schedule, batch: EvalBatch | None, when: str,
                       bars: bool) -> float | None:
    """The fixed evaluation loss (`sd_lora.train.evaluate`), as a phase with a bar over its batches
    (None without an evaluation batch). Its images are the first training images, not held out:
    the label says so."""
    if batch is None:
        return None
    doing = (f"loss {when} on {plural(batch.images, 'training image')} "
             f"({len(EVAL_TIMESTEPS)} timesteps each, fixed noise)")
    with phase("evaluation", doing, eval_chunks(batch.images), unit="batch", bar=bars) as advance:
        return eval_loss(denoiser_of(pipe), text_encoders_of(pipe), schedule, batch,
                         advance=advance)


def finish_run(loop: TrainingLoop, progress: Progress, seconds: float, scan: DatasetScan,
               buckets: dict | None, eval_batch, before: float, started: float,
               bars: bool, style_scorer: StyleScorer | None = None,
               clock: PhaseClock | None = None) -> TrainResult:
    """After the last step: the final evaluation, sample grid, exports, summary, loss plot and
    quality report (the main process writes them), each told as a phase (`bars`: with
    progress bars)."""
    trainee, setup = loop.trainee, loop.setup
    config, accelerator, pipe, trained = setup.config, setup.accelerator, trainee.pipe, trainee.trained
    output_dir, resolution, schedule = setup.output_dir, setup.resolution, setup.objective.schedule
    files: dict[str, Path] = {}
    report = None
    for model in trained.values():
        model.eval()  # training is over: no LoRA dropout in the last evaluation and samples

    def export(job: JobConfig) -> dict[str, Path]:
        names = [str(adapter_path(output_dir, job.train.name, f).relative_to(output_dir))
                 for f in job.export.formats]
        with phase("export", "writing " + ", ".join(names)):
            return export_adapters(trained, model_family(pipe), prediction_type_of(pipe), job,
                                   scan, resolution, output_dir, started, buckets,
                                   model_variant(pipe))

    if trainee.ema is not None:  # the raw weights as <name>-raw; everything after uses the average
        if accelerator.is_main_process:
            export(replace(config, train=replace(config.train, name=f"{config.train.name}-raw")))
        trainee.ema.apply()
    after = measured_eval_loss(pipe, schedule, eval_batch, "after training", bars)
    if accelerator.is_main_process:
        if config.sample.enabled:
            images = len(setup.prompts)
            with phase("samples", f"rendering {plural(images, 'image')} (samples/final.png)",
                       images, bar=bars) as advance:
                render_sample_grid(pipe, config.sample, setup.prompts, resolution,
                                   output_dir / "samples" / "final.png", advance)
        try:
            files = export(config)
        except WRITE_ERRORS as e:  # the final checkpoint holds the trained adapter
            raise write_failed(output_dir / f"{config.train.name}.safetensors", e, output_dir) from e
        write_summary(output_dir, before, after, progress.global_step, seconds, files,
                      loop.guard.skipped, loop.validation_summary())
        setup.log.plot()
        if config.report.enabled:
            report = write_quality_report(pipe, trained.values(), schedule, config, scan,
                                          resolution, output_dir, bars, style_scorer)
        if clock is not None:  # last: it reports every phase before it
            timing = timing_record(clock, loop.step_seconds, accelerator.device,
                                   config.train.mixed_precision)
            write_timing(output_dir, timing)
            say(timing_line(timing))
    accelerator.end_training()
    return TrainResult(output_dir, files, before, after, progress.global_step, seconds, report,
                       eval_batch.images if eval_batch is not None else 0)


def select_samples(config: JobConfig, check) -> tuple[list[Sample], list[Sample]]:
    """(the samples that train: the style's and the regularization images; the held-out ones
    for validation)."""
    regularization = regularization_samples(config.data, check.data, check.regularization)
    style, held_out = split_samples(style_samples(config.data, check.data),
                                    config.data.validation_split, config.train.seed)
    if config.data.validation_path:
        held_out = scan_dataset(Path(config.data.validation_path),
                                caption_extensions=config.data.caption_extensions).samples
    return style + regularization, held_out


def load_training_base(config: JobConfig, accelerator: Accelerator, bars: bool = True):
    """The frozen base on the accelerator's device, with zero terminal SNR when asked.
    `bars`: diffusers' and transformers' own loading bars."""
    if accelerator.num_processes > 1:
        accelerator.print(f"training on {accelerator.num_processes} processes "
                          f"({accelerator.distributed_type.value}); global batch "
                          f"{accelerator.num_processes * config.train.batch_size}")
    with phase("model", f"loading the base {config.model.base!r}"), library_bars(bars):
        pipe = load_frozen_base(config.model, config.train.mixed_precision, accelerator.device)
    if config.train.zero_terminal_snr and prediction_type_of(pipe) != FLOW:
        # training and the sample images alike; refused for SD3 by the Objective, naming why
        pipe.scheduler = zero_terminal_snr_scheduler(pipe.scheduler)
        if prediction_type_of(pipe) == "epsilon":
            say("note: train.zero_terminal_snr with an epsilon-prediction base: at the last "
                "timestep the noise is the input itself; v_prediction is the usual pairing")
    return pipe


@contextlib.contextmanager
def library_bars(shown: bool):
    """diffusers' and transformers' loading bars, hidden with --no-progress (a log would hold
    each redraw), then put back as they were (a notebook keeps its own choice)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging)
                 if not shown and lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


def prepare_run_folder(cfg: TrainConfig, resume: bool) -> Path:
    """Create the output folder; refuse to start over on top of a run's checkpoints."""
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunFolderError(f"--output {output_dir} (train.output_dir) is a file; name a folder "
                             "for the run (a new one, or one of your earlier runs with --resume)")
    existing = list_checkpoints(output_dir)
    if existing and not resume:
        raise RunFolderError(
            f"{output_dir} already holds {existing[-1].name}; pass --resume to continue that run, "
            "or choose another --output (nothing was changed)"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, no permission, a read-only disk
        raise RunFolderError(f"cannot create the run folder {output_dir} (train.output_dir): "
                             f"{e.strerror or e}") from None
    if is_main_process():  # one process tidies; the others would race it
        for stale in remove_incomplete(output_dir):
            say(f"removed {stale.relative_to(output_dir)}: left by a write that was interrupted "
                "(never complete)")
    return output_dir


@contextlib.contextmanager
def removed_if_left_empty(output_dir: Path):
    """A start that fails (bad input found after the folder was made, a base that does not
    load, Ctrl-C) leaves no empty run folder behind, nor the empty parents it created. Only
    empty folders go: anything a run wrote stays."""
    created = [p for p in (output_dir, *output_dir.parents) if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):  # not empty: the run got far enough to write
                folder.rmdir()
        raise


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
    check_process_count(accelerator.num_processes)
    return accelerator


def check_process_count(processes: int) -> None:
    """Started as one of several processes (torchrun, `accelerate launch --multi_gpu`) but set up
    as a lone one: Accelerate does that when it finds no GPU and ACCELERATE_USE_CPU is unset,
    and every process would then train the whole run and write the same files."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and processes == 1:
        raise UserError(
            f"this is process {os.environ.get('RANK', '?')} of {launched} (WORLD_SIZE), but "
            "Accelerate set up a single process (no GPU found), so each would train alone and "
            "write the same run folder. On CPUs set ACCELERATE_USE_CPU=1 (gloo); on GPUs check "
            "that each process sees one"
        )


def load_frozen_base(cfg: ModelConfig, mixed_precision: str, device: torch.device):
    prediction_type = None if cfg.prediction_type == "auto" else cfg.prediction_type
    pipe = load_pipeline(cfg.base, dtype=weight_dtype(mixed_precision),
                         prediction_type=prediction_type, allow_pickle=cfg.allow_pickle,
                         load_t5=cfg.load_t5)
    # bf16 keeps fp32's range, so the VAE stays in it (on the full SD 1.5 at 256 px an fp32
    # encode took most of an uncached step); fp16 overflows in the SD VAEs.
    if cfg.vae_precision == "fp32" or pipe.vae.dtype == torch.float16:
        pipe.vae.to(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def add_adapters(pipe, cfg: LoraConfig) -> dict[str, torch.nn.Module]:
    """Inject LoRA; returns the models that train, keyed by component."""
    ranks = parse_patterns(cfg.rank_pattern, "lora.rank_pattern", int)
    alphas = parse_patterns(cfg.alpha_pattern, "lora.alpha_pattern", float)
    denoiser = denoiser_name(pipe)  # lora.unet_* set SD3's transformer's LoRA too
    adapted = add_lora(getattr(pipe, denoiser), denoiser, cfg.unet_targets, cfg.unet_r,
                       cfg.unet_alpha, cfg.dropout, ranks, alphas, cfg.use_dora, cfg.conv_r,
                       cfg.conv_alpha)
    trained = {denoiser: getattr(pipe, denoiser)}
    encoders = []
    if cfg.train_text_encoder:
        encoders.append("text_encoder")
        if getattr(pipe, "text_encoder_2", None) is not None and cfg.train_text_encoder_2:
            encoders.append("text_encoder_2")
    for name in encoders:
        adapted += add_lora(getattr(pipe, name), name, cfg.text_encoder_targets,
                            cfg.text_encoder_r, cfg.text_encoder_alpha, cfg.dropout, ranks, alphas,
                            cfg.use_dora)
        trained[name] = getattr(pipe, name)
    add_dropouts(trained, AdapterDropouts(cfg.network_dropout, cfg.rank_dropout, cfg.module_dropout))
    for field, patterns in (("lora.rank_pattern", ranks), ("lora.alpha_pattern", alphas)):
        unused = [p for p in patterns if not any(pattern_matches(p, n) for n in adapted)]
        if unused:
            raise UserError(f"{field}: {unused[0]!r} matches none of the {len(adapted)} adapted "
                            f"modules (e.g. {adapted[0]!r}); check the regex")
    return trained


def enable_gradient_checkpointing(trained: dict[str, torch.nn.Module]) -> None:
    """Recompute activations in the backward pass: less memory, ~30% more time per step."""
    for name, model in trained.items():
        if name in ("unet", "transformer"):  # diffusers
            model.enable_gradient_checkpointing()
        else:  # transformers; non-reentrant so frozen inputs still pass gradients to LoRA
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def make_optimizer(trained: dict[str, torch.nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    """train.optimizer over one parameter group per trained model, each with its learning rate;
    with LoRA+ (train.loraplus_lr_ratio) the up projections (lora_B) in their own groups at
    that many times the rate."""
    lrs = {"unet": cfg.learning_rate, "transformer": cfg.learning_rate,
           "text_encoder": cfg.text_encoder_learning_rate,
           "text_encoder_2": cfg.text_encoder_2_learning_rate or cfg.text_encoder_learning_rate}
    groups = []
    for name, model in trained.items():
        params = dict(lora_named_parameters(model))
        if not cfg.loraplus_lr_ratio:
            groups.append({"params": list(params.values()), "lr": lrs[name]})
            continue
        up = [p for n, p in params.items() if ".lora_B." in n]
        groups.append({"params": [p for n, p in params.items() if ".lora_B." not in n], "lr": lrs[name]})
        groups.append({"params": up, "lr": lrs[name] * cfg.loraplus_lr_ratio})
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


def make_validator(trainee: Trainee, setup: RunSetup, held_out: list[Sample], scan: DatasetScan,
                   buckets, started: float, resumed: bool) -> Validator:
    """Validation on the held-out images; the best adapter exported as <name>-best."""
    config, pipe = setup.config, trainee.pipe
    samples = held_out[:VALIDATION_MAX_IMAGES]
    batch = make_eval_batch(*centre_crop_batch(samples, setup.resolution), pipe.vae,
                            tokenizers_of(pipe))
    best_config = replace(config, train=replace(config.train, name=f"{config.train.name}-best"))

    def measure() -> float:
        with eval_mode(trainee.trained.values()):
            return eval_loss(denoiser_of(pipe), text_encoders_of(pipe),
                             setup.objective.schedule, batch)

    def export_best(step: int) -> None:
        if setup.accelerator.is_main_process:
            export_adapters(trainee.trained, model_family(pipe), prediction_type_of(pipe), best_config,
                            scan, setup.resolution, setup.output_dir, started, buckets,
                            model_variant(pipe))

    say(f"validation: {plural(len(samples), 'held-out image')}, every "
        f"{plural(config.train.validation_every, 'step')}"
        + (f", early stop after {config.train.early_stopping_patience} without a new best"
           if config.train.early_stopping_patience else ""))
    return Validator(measure, config.train.validation_every, config.train.early_stopping_patience,
                     setup.output_dir, export_best, resumed, write=setup.accelerator.is_main_process)
