"""The denoising objective: timesteps, noise, targets, loss weights and the loss.

`Objective` gathers one run's choices (from the train config and the base's scheduler) so that
the training loop, `bench/train_speed.py` and the toy world's pretraining draw and weigh the
same way:

    objective = Objective.from_config(cfg.train, training_schedule(scheduler_config, "epsilon"))
    noise, timesteps = objective.draw(latents, generator)
    loss = objective.loss(unet, latents, conditioning, noise, timesteps,
                          objective.weights(timesteps))

Below it, the small pure functions it is made of. Nothing here knows about optimizers, files or
Accelerate. SD3's rectified flow (`sd_lora.objective.flow`) is the same `Objective` over a
`FlowSchedule`: another timestep draw and target, the same noise, loss and masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sd_lora.config import LossKind, TrainConfig
from sd_lora.errors import UserError
from sd_lora.models.text import Conditioning, unet_forward
from sd_lora.objective.flow import FLOW, FlowSchedule, sample_flow_timesteps

Share = tuple[int, int] | None  # (this process, processes) when several draw one global batch


@dataclass(frozen=True)
class Objective:
    """How one run draws noise and timesteps, weighs each sample and measures the loss."""

    schedule: DDPMScheduler | FlowSchedule  # the base's forward process and prediction type
    noise_offset: float = 0.0  # see add_noise_offset
    adaptive_noise_scale: float = 0.0
    multires_noise_iterations: int = 0  # see add_multires_noise
    multires_noise_discount: float = 0.3
    min_snr_gamma: float = 0.0  # 0: off; see min_snr_weights
    debiased_estimation: bool = False  # see debiased_weights
    loss_kind: LossKind = "l2"  # see element_loss
    huber_c: float = 0.1
    timestep_sampling: str = "logit_normal"  # rectified flow only: see objective.flow
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    @classmethod
    def from_config(cls, cfg: TrainConfig, schedule: DDPMScheduler | FlowSchedule) -> Objective:
        check_options(cfg, isinstance(schedule, FlowSchedule))
        return cls(schedule, cfg.noise_offset, cfg.adaptive_noise_scale,
                   cfg.multires_noise_iterations, cfg.multires_noise_discount, cfg.min_snr_gamma,
                   cfg.debiased_estimation, cfg.loss, cfg.huber_c, cfg.timestep_sampling,
                   cfg.logit_mean, cfg.logit_std, cfg.mode_scale)

    def draw(self, latents: torch.Tensor, generator: torch.Generator,
             share: Share = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise like `latents`, timesteps (B,)), drawn from `generator` in a fixed order (a
        resumed run draws exactly what an uninterrupted one would)."""
        noise = sample_noise(latents, generator, share)
        noise = add_multires_noise(noise, self.multires_noise_iterations,
                                   self.multires_noise_discount, generator, share)
        noise = add_noise_offset(noise, self.noise_offset, generator, share, latents,
                                 self.adaptive_noise_scale)
        if isinstance(self.schedule, FlowSchedule):
            shape, rows = _rows((latents.shape[0],), share)
            timesteps = sample_flow_timesteps(self.schedule, shape, generator,
                                              self.timestep_sampling, self.logit_mean,
                                              self.logit_std, self.mode_scale)[rows]
        else:
            timesteps = sample_timesteps(latents.shape[0], self.schedule.config.num_train_timesteps,
                                         generator, share)
        return noise, timesteps

    def weights(self, timesteps: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss weights: `weights` (the data's, e.g. regularization; default 1)
        times Min-SNR and debiased-estimation factors where they are on. (B,) float32"""
        weights = (torch.ones(timesteps.shape[0], device=timesteps.device) if weights is None
                   else weights.float())  # on the caller's device
        if self.min_snr_gamma:
            weights = weights * min_snr_weights(self.schedule, timesteps,
                                                self.min_snr_gamma).to(weights.device)
        if self.debiased_estimation:
            weights = weights * debiased_weights(self.schedule, timesteps).to(weights.device)
        return weights

    def loss(self, unet: torch.nn.Module, latents: torch.Tensor,
             conditioning: torch.Tensor | Conditioning, noise: torch.Tensor,
             timesteps: torch.Tensor, weights: torch.Tensor | None = None,
             wanted: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`denoising_loss` with this run's loss kind."""
        return denoising_loss(unet, self.schedule, latents, conditioning, noise, timesteps,
                              weights, wanted, self.loss_kind, self.huber_c, mask)


# TrainConfig fields that only a DDPM schedule gives a meaning to, with why, and (for the flow
# ones) what only rectified flow reads: each refused where it would be silently ignored.
DDPM_ONLY = {
    "min_snr_gamma": "Min-SNR weighs DDPM timesteps by their signal-to-noise ratio",
    "debiased_estimation": "debiased estimation weighs DDPM timesteps by their signal-to-noise ratio",
    "zero_terminal_snr": "zero terminal SNR rescales a DDPM noise schedule",
}
FLOW_ONLY = {"timestep_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
             "mode_scale": 1.29, "flow_shift": 0.0}


def check_options(cfg: TrainConfig, flow: bool) -> None:
    """Refuse options the base's objective (rectified `flow` or DDPM) would ignore, naming why."""
    for name, why in DDPM_ONLY.items():
        if flow and getattr(cfg, name):
            raise UserError(f"train.{name} does not apply to SD3 bases, which train with "
                            f"rectified flow: {why}. Set it back to its default "
                            "(train.timestep_sampling and train.flow_shift shape SD3's timesteps)")
    for name, default in FLOW_ONLY.items():
        if not flow and getattr(cfg, name) != default:
            raise UserError(f"train.{name} applies to SD3 bases (rectified flow) only; this base "
                            f"trains with a DDPM schedule. Remove it (default {default!r})")


def training_schedule(scheduler_config: dict, prediction_type: str,
                      flow_shift: float = 0.0) -> DDPMScheduler | FlowSchedule:
    """The forward (noising) process of the base model, with the prediction type to train;
    SD3's ("flow") is a FlowSchedule, its shift `flow_shift` when > 0, else the scheduler's."""
    if prediction_type == FLOW:
        return FlowSchedule.from_scheduler_config(scheduler_config, flow_shift)
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    config["prediction_type"] = prediction_type
    return DDPMScheduler.from_config(config)


def zero_terminal_snr_scheduler(scheduler):
    """`scheduler` with betas rescaled so that the last timestep is pure noise (zero terminal
    SNR, Lin et al. 2023) and "trailing" timestep spacing, which sampling then needs. A
    scheduler class without that option (PNDM) is replaced by Euler, which has it; the
    training schedule (`training_schedule` of this one's config) rescales the same way."""
    from diffusers import EulerDiscreteScheduler

    options = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    new = type(scheduler).from_config(scheduler.config, **options)
    if not new.config.get("rescale_betas_zero_snr"):
        new = EulerDiscreteScheduler.from_config(scheduler.config, **options)
    return new


def _rows(shape: tuple[int, ...], share: tuple[int, int] | None) -> tuple[tuple[int, ...], slice]:
    """The shape to draw and the rows to keep: with `share` = (process index, processes) every
    process draws the whole global batch from the same generator and keeps its own rows, so N
    processes of B images see exactly the numbers one process of N x B would."""
    if share is None:
        return shape, slice(None)
    rank, count = share
    return (shape[0] * count, *shape[1:]), slice(rank * shape[0], (rank + 1) * shape[0])


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, generator: torch.Generator,
    share: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Uniform integer timesteps in [0, T), one per sample. (B,)"""
    shape, rows = _rows((batch_size,), share)
    return torch.randint(0, num_train_timesteps, shape, generator=generator)[rows]


def sample_noise(latents: torch.Tensor, generator: torch.Generator,
                 share: tuple[int, int] | None = None) -> torch.Tensor:
    """Standard normal noise shaped like the latents, drawn on the CPU for reproducibility."""
    shape, rows = _rows(tuple(latents.shape), share)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)[rows]
    return noise.to(device=latents.device, dtype=latents.dtype)


def add_noise_offset(
    noise: torch.Tensor, strength: float, generator: torch.Generator,
    share: tuple[int, int] | None = None, latents: torch.Tensor | None = None,
    adaptive: float = 0.0,
) -> torch.Tensor:
    """`noise` plus a per-image, per-channel constant of scale `strength` (sd-scripts'
    noise_offset): lets training change an image's overall colour, which SD's schedule never
    fully noises away. With `adaptive` (sd-scripts' adaptive_noise_scale) the scale grows with
    each latent channel's mean: strength + adaptive * |mean(latents)|, at least 0."""
    if not strength:
        return noise
    shape, rows = _rows(tuple(noise.shape[:2]) + (1, 1), share)
    shift = torch.randn(shape, generator=generator, dtype=torch.float32)[rows]
    scale = torch.tensor(strength, dtype=torch.float32)
    if adaptive and latents is not None:
        scale = (strength + adaptive * latents.float().mean(dim=(2, 3), keepdim=True).abs().cpu())
        scale = scale.clamp(min=0.0)  # (B, C, 1, 1)
    return noise + (scale * shift).to(device=noise.device, dtype=noise.dtype)


def add_multires_noise(noise: torch.Tensor, iterations: int, discount: float,
                       generator: torch.Generator, share: tuple[int, int] | None = None) -> torch.Tensor:
    """Pyramid (multi-resolution) noise, sd-scripts' multires_noise_iterations/_discount: noise
    at sizes 1/r^i of the latent (r drawn in [2, 4) each level; `discount`^i as strong)
    upsampled and added, then the sum rescaled to unit variance: low frequencies get noised too. The scale
    factors come from `generator` as well, so a run is reproducible and resumable."""
    if iterations <= 0:
        return noise
    b, c, h, w = noise.shape
    total = noise.float()
    for i in range(iterations):  # i = 0 adds a second full-size noise, as sd-scripts does
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        shape, rows = _rows((b, c, hn, wn), share)
        coarse = torch.randn(shape, generator=generator, dtype=torch.float32)[rows]
        up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        total = total + up.to(total.device) * discount**i
        if hn == 1 or wn == 1:
            break
    return (total / total.std()).to(noise.dtype)


def debiased_weights(schedule: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """sd-scripts' debiased_estimation_loss weights: 1 / sqrt(SNR) for epsilon prediction,
    1 / (SNR + 1) for v-prediction, SNR capped at 1000 (it is infinite near t = 0) and, for
    zero terminal SNR, floored at 1e-3 (1 / sqrt(0) would be infinite). (B,)"""
    alphas = schedule.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = (alphas / (1 - alphas)).clamp(min=1e-3, max=1000.0)
    if schedule.config.prediction_type == "v_prediction":
        return 1 / (snr + 1)
    return 1 / snr.sqrt()


def target(
    schedule: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the denoiser should predict: the noise (epsilon), the velocity (v-prediction), or
    for rectified flow noise - x0."""
    kind = schedule.config.prediction_type
    if kind == FLOW:
        return schedule.velocity(latents, noise)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return schedule.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction type {kind!r} is not supported; use epsilon or v_prediction")


def min_snr_weights(schedule: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for
    epsilon prediction, min(SNR, gamma) / (SNR + 1) for v-prediction. (B,)

    Why: the unweighted noise-prediction loss at the smallest timesteps is ~100x that of the
    middle ones (the toy base: 0.39 at t=1, 0.015 at t=300), so those few nearly-clean steps,
    which decide little of what a person sees, dominate the gradient."""
    alphas = schedule.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    if schedule.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    # min(SNR, gamma) / SNR -> 1 as SNR -> 0 (zero terminal SNR has SNR = 0 at the last step)
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))


def denoising_loss(
    unet: torch.nn.Module,
    schedule: DDPMScheduler,
    latents: torch.Tensor,  # (B, 4, h, w), already scaled by the VAE scaling factor
    text_embeddings: torch.Tensor | Conditioning,  # (B, 77, D), or SDXL's Conditioning
    noise: torch.Tensor,  # (B, 4, h, w)
    timesteps: torch.Tensor,  # (B,)
    weights: torch.Tensor | None = None,  # (B,) per-sample loss weights, e.g. min_snr_weights
    wanted: torch.Tensor | None = None,  # (B, 4, h, w) instead of `target`, e.g. preserved_target
    kind: str = "l2",  # see element_loss
    huber_c: float = 0.1,
    mask: torch.Tensor | None = None,  # (B, 1, H, W) in [0, 1], any size: data.masked_loss
) -> torch.Tensor:
    """The element loss (squared error by default) between the UNet's prediction and the
    target, in fp32, averaged; with `weights`, the mean over samples of weight x that sample's
    mean loss. With `mask` (resized to the latents by area) each element's loss is scaled by
    it before the mean, as sd-scripts' masked_loss does: masked-out pixels add nothing and the
    mean still counts them, so a half-masked image weighs half."""
    noisy = schedule.add_noise(latents, noise, timesteps.to(latents.device))
    prediction = unet_forward(unet, noisy, timesteps.to(latents.device), text_embeddings)
    if wanted is None:
        wanted = target(schedule, latents.float(), noise.float(), timesteps.to(latents.device))
    per_element = element_loss(prediction.float(), wanted.float(), kind, huber_c)
    if mask is not None:
        per_element = per_element * F.interpolate(mask.float().to(per_element.device),
                                                  size=per_element.shape[-2:], mode="area")
    if weights is None:
        return per_element.mean()
    return (per_element.mean(dim=tuple(range(1, per_element.ndim))) * weights.float()).mean()


def element_loss(prediction: torch.Tensor, wanted: torch.Tensor, kind: str = "l2",
                 huber_c: float = 0.1) -> torch.Tensor:
    """Per-element loss: "l2" e^2; sd-scripts' pseudo-Huber "huber" 2c(sqrt(e^2 + c^2) - c) and
    "smooth_l1" 2(sqrt(e^2 + c^2) - c), with e = prediction - wanted. Both Huber forms are
    ~e^2 (times 1, resp. 1/c) for |e| << c and linear in |e| beyond: a few wild errors (a
    mislabeled image, an outlier timestep) pull less."""
    if kind == "l2":
        return F.mse_loss(prediction, wanted, reduction="none")
    error = prediction - wanted
    soft = torch.sqrt(error**2 + huber_c**2) - huber_c
    if kind == "huber":
        return 2 * huber_c * soft
    if kind == "smooth_l1":
        return 2 * soft
    raise ValueError(f"unknown loss {kind!r}; use l2, huber or smooth_l1")


@torch.no_grad()
def preserved_target(
    base_unet: torch.nn.Module,  # the UNet as the base has it (the caller switches the adapter off)
    schedule: DDPMScheduler,
    latents: torch.Tensor,
    base_embeddings: torch.Tensor | Conditioning,  # the prompts as the base encodes them
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    preserve: torch.Tensor,  # (B,) bool: which samples keep the base's prediction
) -> torch.Tensor:
    """`target`, except that the samples marked `preserve` are to predict what the base predicts
    for the same noisy latent and prompt (output preservation). Only those samples are run
    through the base. (B, 4, h, w) float32"""
    device = latents.device
    wanted = target(schedule, latents.float(), noise.float(), timesteps.to(device)).clone()
    keep = preserve.to(device)
    if keep.any():
        noisy = schedule.add_noise(latents[keep], noise[keep], timesteps.to(device)[keep])
        kept = (base_embeddings.select(keep) if isinstance(base_embeddings, Conditioning)
                else base_embeddings[keep])
        base = unet_forward(base_unet, noisy, timesteps.to(device)[keep], kept)
        wanted[keep] = base.float()
    return wanted
