"""The training loop itself: optimizer steps until max_steps, with checkpoints, samples,
validation and the NaN guard on the way; an interrupt stops it between two steps.

`train.train` builds everything and hands it to `TrainingLoop`; nothing here loads models or
reads the config file.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from tqdm import tqdm

from sd_lora.config import flat_config
from sd_lora.lora.inject import lora_parameters, lora_weight
from sd_lora.models.text import encode_all, text_encoders_of, tokenize_all, tokenizers_of
from sd_lora.objective import (
    add_multires_noise,
    add_noise_offset,
    debiased_weights,
    denoising_loss,
    min_snr_weights,
    preserved_target,
    sample_noise,
    sample_timesteps,
)
from sd_lora.train.checkpoint import (
    WRITE_ERRORS,
    Progress,
    checkpoint_path,
    prune_checkpoints,
    save_checkpoint,
    write_failed,
)
from sd_lora.train.nonfinite import (
    NonFiniteGuard,
    StepSnapshot,
    count_nonfinite,
    describe,
    describe_update,
    gradients_finite,
)
from sd_lora.train.outputs import adapter_path, render_sample_grid
from sd_lora.train.stop_signals import ImmediateStop, StopSignals
from sd_lora.train.validation import Validator
from sd_lora.util.processes import say
from sd_lora.util.words import plural

PROGRESS_LINES = 10  # without a bar, a line every tenth of the run


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
        self.problem_is_update = False  # the loss and gradients were finite, the update not
        self.latent_cache = None  # data.latent_cache.LatentCache when data.cache_latents is on
        self.text_cache = None  # text.EmbeddingCache when data.cache_text_encoder_outputs is on
        self.validator: Validator | None = None  # with held-out images
        self.ema = None  # ema.AdapterEMA when train.ema_decay is set
        self.stopped_early = False

    def run(self, loader, dataset, progress: Progress, show_progress: bool) -> Progress:
        cfg = self.config.train
        bar = tqdm(total=cfg.max_steps, initial=progress.global_step, desc="training",
                   unit="step", disable=not (show_progress and self.accelerator.is_main_process))
        step, epoch, skip = progress.global_step, progress.epoch, progress.batches_done_in_epoch
        started = time.time()
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
                            if bar.disable:
                                self.tell(step, progress.global_step, loss, started)
                            self.after_step(Progress(step, epoch, done_in_epoch))
                        else:  # nothing changed; raises when it keeps happening
                            self.guard.bad(step + 1, loss, self.problem, self.problem_is_update)
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

    def tell(self, step: int, first: int, loss: float, started: float) -> None:
        """Without a bar (--no-progress, the app's log), a line every tenth of the run: the
        step, the loss and the time left."""
        steps = self.config.train.max_steps
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
        n = self.accelerator.num_processes
        return None if n == 1 else (self.accelerator.process_index, n)

    def train_micro_batch(self, batch) -> float:
        accelerator = self.accelerator
        unet = self.models["unet"]
        with accelerator.accumulate(*self.models.values()):
            latents = self.latents_of(batch)
            share = self.share
            noise = sample_noise(latents, self.noise_generator, share)
            cfg = self.config.train
            noise = add_multires_noise(noise, cfg.multires_noise_iterations,
                                       cfg.multires_noise_discount, self.noise_generator, share)
            noise = add_noise_offset(noise, cfg.noise_offset, self.noise_generator, share,
                                     latents, cfg.adaptive_noise_scale)
            timesteps = sample_timesteps(latents.shape[0], self.schedule.config.num_train_timesteps,
                                         self.noise_generator, share)
            input_ids = tokenize_all(tokenizers_of(self.pipe), batch["caption"]).to(accelerator.device)
            if self.text_cache is not None:  # the encoders are frozen (the config checks)
                embeddings = self.text_cache.conditioning(
                    tokenizers_of(self.pipe), text_encoders_of(self.pipe), list(batch["caption"]),
                    batch.get("time_ids"), accelerator.device)
            else:
                with torch.set_grad_enabled(len(self.models) > 1):  # a text encoder trains
                    embeddings = self.encode(input_ids, batch.get("time_ids"))
            weights = batch["loss_weight"].to(accelerator.device, torch.float32)
            if cfg.min_snr_gamma:
                weights = weights * min_snr_weights(self.schedule, timesteps, cfg.min_snr_gamma)
            if cfg.debiased_estimation:
                weights = weights * debiased_weights(self.schedule, timesteps).to(weights.device)
            wanted = self.preserved_targets(batch, latents, noise, timesteps, input_ids,
                                            embeddings)
            loss = denoising_loss(unet, self.schedule, latents, embeddings, noise, timesteps,
                                  weights, wanted, cfg.loss, cfg.huber_c, batch.get("mask"))
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
                    self.problem_is_update = False
                self.window_bad_loss = None
                if applied:
                    applied = self.optimizer_step(params)
            self.optimizer.zero_grad(set_to_none=True)
        return loss_value, applied

    def optimizer_step(self, params: list[torch.nn.Parameter]) -> bool:
        """Clip, step, and keep the update only if every weight is still finite (else the
        weights and optimizer state are put back, see nonfinite.StepSnapshot); then the
        schedule and the EMA follow. False when the update was undone."""
        if self.config.train.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(params, self.config.train.max_grad_norm)
        before = StepSnapshot(self.optimizer, params)
        self.optimizer.step()
        bad, total = count_nonfinite(params)
        if bad:
            before.restore()
            self.problem, self.problem_is_update = describe_update(bad, total), True
            return False
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update()
        return True

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
        latents = mean + std * sample_noise(mean, self.noise_generator, self.share)
        unet_dtype = next(self.pipe.unet.parameters()).dtype
        return (latents * self.pipe.vae.config.scaling_factor).to(unet_dtype)

    def after_step(self, progress: Progress) -> None:
        cfg, sample = self.config.train, self.config.sample
        step = progress.global_step
        if self.validator is not None and self.validator.due(step, step >= cfg.max_steps):
            # With EMA the average is what an export at this step would hold: measure (and
            # keep as <name>-best) that, not the raw weights.
            with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
                loss, self.stopped_early = self.validator.validate(step)
            self.accelerator.log({"validation/loss": loss}, step=step)
            if self.stopped_early:
                state = self.validator.state
                self.accelerator.print(
                    f"early stop at step {step}: {plural(state.since_best, 'validation')} "
                    "without a new best "
                    f"(best {state.best_loss:.4f} at step {state.best_step})")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            self.save(progress)
        if sample.every and step % sample.every == 0 and step < cfg.max_steps:
            if self.accelerator.is_main_process:
                path = self.output_dir / "samples" / f"step-{step:06d}.png"
                with eval_mode(self.models.values()):
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
                                self.noise_generator, flat_config(self.config),
                                extra=self.ema.tensors() if self.ema is not None else None)
            except WRITE_ERRORS as e:  # the older checkpoints are untouched: prune runs after
                raise write_failed(folder, e, self.output_dir) from e
            prune_checkpoints(self.output_dir, self.config.train.checkpoints_keep)
        self.accelerator.wait_for_everyone()


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

