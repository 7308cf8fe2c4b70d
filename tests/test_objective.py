"""The objective's targets and loss, checked against the closed-form noising process."""

from __future__ import annotations

import torch

from sd_lora.models.builtin.tiny import sd1_scheduler_config
from sd_lora.objective import (
    denoising_loss,
    min_snr_weights,
    sample_timesteps,
    target,
    training_schedule,
)


def test_epsilon_target_is_the_noise():
    schedule = training_schedule(sd1_scheduler_config(), "epsilon")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(target(schedule, latents, noise, torch.tensor([10, 900])), noise)


def test_v_target_matches_formula():
    schedule = training_schedule(sd1_scheduler_config(), "v_prediction")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * latents  # v = sqrt(a) eps - sqrt(1-a) x0
    assert torch.allclose(target(schedule, latents, noise, t), expected, atol=1e-6)


def test_timesteps_are_reproducible_and_in_range():
    a = sample_timesteps(1000, 1000, torch.Generator().manual_seed(3))
    b = sample_timesteps(1000, 1000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 1000


class _Oracle(torch.nn.Module):
    """A 'UNet' that returns a given tensor, to check the loss arithmetic."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, noisy, timesteps, embeddings):
        return type("Out", (), {"sample": self.output})()


def test_loss_is_zero_for_a_perfect_prediction_and_mse_otherwise():
    schedule = training_schedule(sd1_scheduler_config(), "epsilon")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([5, 500])
    assert denoising_loss(_Oracle(noise), schedule, latents, None, noise, t) == 0
    loss = denoising_loss(_Oracle(noise + 0.5), schedule, latents, None, noise, t)
    assert abs(float(loss) - 0.25) < 1e-6


def test_min_snr_weights_follow_the_formula_for_both_prediction_types():
    t = torch.tensor([1, 20, 100, 300, 900])
    for kind in ("epsilon", "v_prediction"):
        schedule = training_schedule(sd1_scheduler_config(), kind)
        abar = schedule.alphas_cumprod[t].double()
        snr = abar / (1 - abar)
        denominator = snr if kind == "epsilon" else snr + 1
        expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / denominator
        got = min_snr_weights(schedule, t, 5.0)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    eps = min_snr_weights(training_schedule(sd1_scheduler_config(), "epsilon"), t, 5.0)
    assert eps[0] < 0.01 and eps[1] < 0.2  # nearly-clean steps count for little ...
    assert torch.equal(eps[-2:], torch.ones(2))  # ... noisy ones (SNR < gamma) in full


def test_weighted_loss_is_the_weighted_mean_of_per_sample_errors():
    schedule = training_schedule(sd1_scheduler_config(), "epsilon")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    error = torch.zeros(2, 4, 8, 8)
    error[0], error[1] = 1.0, 3.0  # per-sample MSE 1 and 9
    t = torch.tensor([5, 500])
    weighted = denoising_loss(_Oracle(noise + error), schedule, latents, None, noise, t,
                              torch.tensor([0.5, 0.1]))
    assert abs(float(weighted) - (0.5 * 1 + 0.1 * 9) / 2) < 1e-6
