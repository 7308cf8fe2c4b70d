"""The step loop: optimizer steps until max_steps, with checkpoints, samples,
validation and the NaN guard on the way; an interrupt stops it between two steps.

`sd_lora.train.recipe.train` builds what is trained (`Trainee`) and how the run goes (`RunSetup`)
and hands both to `TrainingLoop`; nothing here loads models or reads the config file. Each step
draws and weighs through the run's `Objective`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from tqdm import tqdm

from sd_lora.config import JobConfig, flat_config
from sd_lora.lora.inject import lora_parameters, lora_weight, uncast_inputs
from sd_lora.models.families import denoiser_name, denoiser_of
from sd_lora.models.text import (
    EmbeddingCache,
    encode_all,
    text_encoders_of,
    tokenize_all,
    tokenizers_of,
)
from sd_lora.models.vae import encode_posterior, scale_latents
from sd_lora.objective import Objective, preserved_target, sample_noise
from sd_lora.train.checkpoint import (
    WRITE_ERRORS,
    Progress,
    checkpoint_path,
    prune_checkpoints,
    save_checkpoint,
    write_failed,
)
from sd_lora.train.ema import AdapterEMA
from sd_lora.train.nonfinite import (
    NonFiniteGuard,
    StepSnapshot,
    count_nonfinite,
    describe,
    describe_update,
    gradients_finite,
)
from sd_lora.train.outputs import RunLog, adapter_path, render_sample_grid
from sd_lora.train.stop_signals import ImmediateStop, StopSignals
from sd_lora.train.validation import Validator
from sd_lora.util.processes import say
from sd_lora.util.words import plural

PROGRESS_LINES = 10  # without a bar, a line every tenth of the run


@dataclass
class Trainee:
    """What is trained: the pipeline, its models that carry LoRA layers, and what updates them."""

    pipe: DiffusionPipeline
    trained: dict[str, torch.nn.Module]  # component -> its model with LoRA layers
    models: dict[str, torch.nn.Module]  # the same models as Accelerate prepared them
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any  # a torch LR scheduler (Accelerate-prepared)
    ema: AdapterEMA | None = None  # with train.ema_decay


@dataclass
class RunSetup:
    """How the run goes: its config and processes, the objective and its random draws, and
    where it writes."""

    config: JobConfig
    accelerator: Accelerator
    objective: Objective
    noise_generator: torch.Generator  # every draw of the run: noise, timesteps, latents
    resolution: int
    prompts: list[str]  # the sample grids'
    output_dir: Path | None = None  # checkpoints and samples (None: nothing is written)
    log: RunLog | None = None
    text_cache: EmbeddingCache | None = None  # with data.cache_text_encoder_outputs


class TrainingLoop:
    """Runs optimizer steps until max_steps, checkpointing and sampling on the way."""

    def __init__(self, trainee: Trainee, setup: RunSetup, validator: Validator | None = None):
        self.trainee, self.setup, self.validator = trainee, setup, validator
        train = setup.config.train if setup.config is not None else None
        self.guard = NonFiniteGuard(train.max_nonfinite_steps if train else 0,
                                    train.mixed_precision if train else "no",
                                    train.learning_rate if train else 0.0)
        self.window_bad_loss = None  # the first NaN/inf loss of the current accumulation
        self.problem = ""
        self.problem_is_update = False  # the loss and gradients were finite, the update not
        self.stopped_early = False
        self.step_seconds: list[float] = []  # per optimizer step, data loading included

    def run(self, loader, dataset, progress: Progress, show_progress: bool) -> Progress:
        cfg = self.setup.config.train
        bar = tqdm(total=cfg.max_steps, initial=progress.global_step, desc="training",
                   unit="step", disable=not (show_progress and self.setup.accelerator.is_main_process))
        step, epoch, skip = progress.global_step, progress.epoch, progress.batches_done_in_epoch
        started = time.time()
        last = time.perf_counter()
        done_in_epoch = skip
        for model in self.trainee.models.values():
            model.train()
        try:
            with StopSignals() as stop:
                while step < cfg.max_steps:
                    loader.set_epoch(epoch)  # sets the sampler's epoch (and Accelerate's counter)
                    dataset.set_epoch(epoch)
                    batches = self.setup.accelerator.skip_first_batches(loader, skip) if skip else loader
                    done_in_epoch = skip
                    for batch in batches:
                        loss, applied = self.train_micro_batch(batch)
                        done_in_epoch += 1
                        if not self.setup.accelerator.sync_gradients:
                            continue
                        if applied:
                            self.step_seconds.append(time.perf_counter() - last)
                            step += 1
                            self.guard.good()
                            bar.update(1)
                            bar.set_postfix(loss=f"{loss:.4f}",
                                            lr=f"{self.trainee.lr_scheduler.get_last_lr()[0]:.2e}")
                            self.setup.log.step(step, loss, self.trainee.lr_scheduler.get_last_lr()[0], epoch)
                            if bar.disable:
                                self.tell(step, progress.global_step, loss, started)
                            self.after_step(Progress(step, epoch, done_in_epoch))
                        else:  # nothing changed; raises when it keeps happening
                            self.guard.bad(step + 1, loss, self.problem, self.problem_is_update)
                            bar.set_postfix(loss=f"{loss:.4f}", skipped=self.guard.skipped)
                        last = time.perf_counter()  # checkpoints and samples are not the step's
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

    def tell(self, step: int, first: int, loss: float, started: float) -> None:
        """Without a bar (--no-progress, the app's log), a line every tenth of the run: the
        step, the loss and the time left."""
        steps = self.setup.config.train.max_steps
        if step % max(1, steps // PROGRESS_LINES) and step != steps:
            return
        elapsed = time.time() - started
        left = elapsed / max(1, step - first) * (steps - step)
        say(f"training: step {step}/{steps} ({step / steps:.0%}), loss {loss:.4f}, "
            f"{elapsed:.0f} s so far, about {left:.0f} s left")

    @property
    def share(self) -> tuple[int, int] | None:
        """(this process, processes) when several train: the random draws are shared (see
        objective._rows), so the run equals one process with the same global batch."""
        n = self.setup.accelerator.num_processes
        return None if n == 1 else (self.setup.accelerator.process_index, n)

    def train_micro_batch(self, batch) -> tuple[float, bool]:
        """One micro-batch: draw, encode, loss, backward; at the end of an accumulation window
        the optimizer step (undone if it makes a weight non-finite). (loss, step kept)"""
        accelerator, pipe = self.setup.accelerator, self.trainee.pipe
        unet = self.trainee.models[denoiser_name(pipe)]
        # Under Accelerate's autocast PEFT's fp32 copies of the LoRA inputs change nothing; with
        # a dropout on that path they would change its rounding, so they stay then.
        lora = self.setup.config.lora
        uncast = self.setup.config.train.mixed_precision != "no" and not any(
            (lora.dropout, lora.network_dropout, lora.rank_dropout, lora.module_dropout))
        with accelerator.accumulate(*self.trainee.models.values()), \
                uncast_inputs(self.trainee.trained.values(), active=uncast):
            latents = self.latents_of(batch)
            objective = self.setup.objective
            noise, timesteps = objective.draw(latents, self.setup.noise_generator, self.share)
            input_ids = tokenize_all(tokenizers_of(pipe), batch["caption"]).to(accelerator.device)
            if self.setup.text_cache is not None:  # the encoders are frozen (the config checks)
                embeddings = self.setup.text_cache.conditioning(
                    tokenizers_of(pipe), text_encoders_of(pipe), list(batch["caption"]),
                    batch.get("time_ids"), accelerator.device)
            else:
                with torch.set_grad_enabled(len(self.trainee.models) > 1):  # a text encoder trains
                    embeddings = self.encode(input_ids, batch.get("time_ids"))
            weights = objective.weights(timesteps, batch["loss_weight"].to(accelerator.device))
            wanted = self.preserved_targets(batch, latents, noise, timesteps, input_ids,
                                            embeddings)
            loss = objective.loss(unet, latents, embeddings, noise, timesteps, weights, wanted,
                                  batch.get("mask"))
            accelerator.backward(loss)
            loss_value = float(accelerator.gather(loss.detach()).mean())  # NaN if any process's is
            if not math.isfinite(loss_value) and self.window_bad_loss is None:
                self.window_bad_loss = loss_value
            applied = True
            if accelerator.sync_gradients:
                params = [p for m in self.trainee.trained.values() for p in lora_parameters(m)]
                # Under fp16 the loss scaler skips inf gradients itself; otherwise we do.
                grads_ok = accelerator.scaler is not None or gradients_finite(params)
                applied = self.window_bad_loss is None and grads_ok
                if not applied:
                    self.problem = describe(self.window_bad_loss, grads_ok)
                    self.problem_is_update = False
                self.window_bad_loss = None
                if applied:
                    applied = self.optimizer_step(params)
            self.trainee.optimizer.zero_grad(set_to_none=True)
        return loss_value, applied

    def optimizer_step(self, params: list[torch.nn.Parameter]) -> bool:
        """Clip, step, and keep the update only if every weight is still finite (else the
        weights and optimizer state are put back, see nonfinite.StepSnapshot); then the
        schedule and the EMA follow. False when the update was undone."""
        if self.setup.config.train.max_grad_norm > 0:
            self.setup.accelerator.clip_grad_norm_(params, self.setup.config.train.max_grad_norm)
        before = StepSnapshot(self.trainee.optimizer, params)
        self.trainee.optimizer.step()
        bad, total = count_nonfinite(params)
        if bad:
            before.restore()
            self.problem, self.problem_is_update = describe_update(bad, total), True
            return False
        self.trainee.lr_scheduler.step()
        if self.trainee.ema is not None:
            self.trainee.ema.update()
        return True

    def preserved_targets(self, batch, latents, noise, timesteps, input_ids, embeddings=None):
        """Targets with the base's own predictions for the batch's `preserve` items
        (data.regularization_target = "base"); None when there are none, so the loss uses the
        noise as usual. With frozen text encoders `embeddings` are the base's already."""
        preserve = batch["preserve"]
        if not bool(preserve.any()):
            return None
        unet = self.trainee.models[denoiser_name(self.trainee.pipe)]
        with torch.no_grad(), lora_weight(self.trainee.trained.values(), 0.0):
            frozen = len(self.trainee.models) == 1 and embeddings is not None
            base_embeddings = embeddings if frozen else self.encode(input_ids, batch.get("time_ids"))
            return preserved_target(unet, self.setup.objective.schedule, latents, base_embeddings, noise,
                                    timesteps, preserve)

    def encode(self, input_ids: torch.Tensor, time_ids: torch.Tensor | None):
        """Token ids (B, E, 77) -> the UNet's conditioning, through the encoders that train
        (Accelerate-prepared) and the frozen ones; `time_ids` (B, 6) is SDXL's (see data.dataset)."""
        encoders = text_encoders_of(self.trainee.pipe, self.trainee.models)
        if time_ids is not None:
            time_ids = time_ids.to(self.setup.accelerator.device)
        return encode_all(encoders, input_ids, time_ids)

    @torch.no_grad()
    def latents_of(self, batch: dict) -> torch.Tensor:
        """The batch's scaled latents, sampled from the VAE posterior: encoded now from
        `pixel_values`, or (data.cache_latents) from the cached posterior the batch carries."""
        if "latent_mean" not in batch:
            return self.encode_images(batch["pixel_values"])
        device = self.setup.accelerator.device
        return self._sample_latents(batch["latent_mean"].to(device), batch["latent_std"].to(device))

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) scaled latents, sampled from the VAE."""
        return self._sample_latents(*encode_posterior(self.trainee.pipe.vae, pixel_values))

    def _sample_latents(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        latents = mean + std * sample_noise(mean, self.setup.noise_generator, self.share)
        unet_dtype = next(denoiser_of(self.trainee.pipe).parameters()).dtype
        return scale_latents(self.trainee.pipe.vae, latents).to(unet_dtype)

    def after_step(self, progress: Progress) -> None:
        cfg, sample = self.setup.config.train, self.setup.config.sample
        step = progress.global_step
        if self.validator is not None and self.validator.due(step, step >= cfg.max_steps):
            # With EMA the average is what an export at this step would hold: measure (and
            # keep as <name>-best) that, not the raw weights.
            with self.trainee.ema.swapped_in() if self.trainee.ema is not None else contextlib.nullcontext():
                loss, self.stopped_early = self.validator.validate(step)
            self.setup.accelerator.log({"validation/loss": loss}, step=step)
            if self.stopped_early:
                state = self.validator.state
                self.setup.accelerator.print(
                    f"early stop at step {step}: {plural(state.since_best, 'validation')} "
                    "without a new best "
                    f"(best {state.best_loss:.4f} at step {state.best_step})")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            self.save(progress)
        if sample.enabled and sample.every and step % sample.every == 0 and step < cfg.max_steps:
            if self.setup.accelerator.is_main_process:
                path = self.setup.output_dir / "samples" / f"step-{step:06d}.png"
                with eval_mode(self.trainee.models.values()):
                    render_sample_grid(self.trainee.pipe, sample, self.setup.prompts, self.setup.resolution, path)

    def validation_summary(self) -> dict | None:
        if self.validator is None:
            return None
        state, name = self.validator.state, f"{self.setup.config.train.name}-best"
        paths = {fmt: adapter_path(self.setup.output_dir, name, fmt) for fmt in self.setup.config.export.formats}
        return {"best_loss": state.best_loss, "best_step": state.best_step,  # (written before a resume too)
                "best_adapters": {fmt: str(p) for fmt, p in paths.items() if p.is_file()},
                "stopped_early": self.stopped_early}

    def save(self, progress: Progress) -> None:
        self.setup.accelerator.wait_for_everyone()
        if self.setup.accelerator.is_main_process:
            folder = checkpoint_path(self.setup.output_dir, progress.global_step)
            try:
                save_checkpoint(folder, self.trainee.trained, self.trainee.optimizer, self.trainee.lr_scheduler, progress,
                                self.setup.noise_generator, flat_config(self.setup.config),
                                extra=self.trainee.ema.tensors() if self.trainee.ema is not None else None)
            except WRITE_ERRORS as e:  # the older checkpoints are untouched: prune runs after
                raise write_failed(folder, e, self.setup.output_dir) from e
            prune_checkpoints(self.setup.output_dir, self.setup.config.train.checkpoints_keep)
        self.setup.accelerator.wait_for_everyone()


class eval_mode:
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

