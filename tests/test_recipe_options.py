"""Recipe options shown to have their effect: learning-rate schedules (warmup honoured by every
one, restarts, polynomial power), the pseudo-Huber losses, tag shuffling with keep_tokens and
caption dropout."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace

import pytest
import torch

from sd_lora.config import ConfigError, load_config
from sd_lora.data import ImageCaptionDataset, scan_dataset
from sd_lora.data.dataset import shuffled_tags
from sd_lora.models.builtin.tiny import sd1_scheduler_config
from sd_lora.objective import denoising_loss, element_loss, min_snr_weights, training_schedule
from sd_lora.train.recipe import make_lr_scheduler, style_samples
from tests.test_world import TOY_DATA


def learning_rates(*overrides: str, steps: int = 20) -> list[float]:
    cfg = load_config(None, [f"train.max_steps={steps}", *overrides]).train
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_lr_scheduler(optimizer, cfg, num_processes=1)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_constant_schedule_honours_warmup():
    # diffusers' own "constant" would ignore the warmup steps: 1.0 from the first step.
    assert learning_rates("train.lr_warmup_steps=4")[:6] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert set(learning_rates()) == {1.0}


def test_cosine_with_restarts_and_polynomial_follow_their_formulas():
    rates = learning_rates('train.lr_scheduler="cosine_with_restarts"', "train.lr_scheduler_num_cycles=2")
    for t, lr in enumerate(rates):  # each half of the run is one full cosine from 1 to 0
        phase = (t % 10) / 10
        assert math.isclose(lr, 0.5 * (1 + math.cos(math.pi * phase)), abs_tol=1e-6), t
    assert rates[10] == 1.0 and rates[9] < 0.03  # the restart
    rates = learning_rates('train.lr_scheduler="polynomial"', "train.lr_scheduler_power=2")
    for t, lr in enumerate(rates):
        assert math.isclose(lr, (1 - t / 20) ** 2, abs_tol=1e-6), t
    with pytest.raises(ConfigError, match="lr_scheduler_num_cycles = 0 must be positive"):
        load_config(None, ["train.lr_scheduler_num_cycles=0"])


def test_pseudo_huber_losses_are_quadratic_near_zero_and_linear_far_away():
    c = 0.1
    e = torch.tensor([1e-3, 0.05, 1.0, 10.0])
    zero = torch.zeros(4)
    torch.testing.assert_close(element_loss(e, zero, "l2"), e**2)
    huber, smooth = element_loss(e, zero, "huber", c), element_loss(e, zero, "smooth_l1", c)
    torch.testing.assert_close(huber, 2 * c * (torch.sqrt(e**2 + c**2) - c))
    assert math.isclose(huber[0].item(), 1e-6, rel_tol=1e-3)  # ~e^2 for |e| << c
    assert math.isclose(smooth[0].item(), 1e-6 / c, rel_tol=1e-3)  # ~e^2 / c
    assert math.isclose(huber[3].item(), 2 * c * 10 - 2 * c * c, rel_tol=1e-3)  # ~2c|e|
    assert math.isclose(smooth[3].item(), 2 * 10 - 2 * c, rel_tol=1e-3)  # ~2|e|
    assert huber[3] < (e**2)[3] / 40  # an outlier pulls far less than under l2
    with pytest.raises(ValueError, match="unknown loss"):
        element_loss(e, zero, "l1")


def test_denoising_loss_uses_the_chosen_element_loss():
    class Oracle(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, *args):
            return type("Out", (), {"sample": self.out})()

    schedule = training_schedule(sd1_scheduler_config(), "epsilon")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    wrong = noise + 3.0
    t = torch.tensor([5, 500])
    huber = denoising_loss(Oracle(wrong), schedule, latents, None, noise, t, kind="huber", huber_c=0.1)
    assert math.isclose(float(huber), 2 * 0.1 * (math.sqrt(9 + 0.01) - 0.1), rel_tol=1e-5)
    assert math.isclose(float(denoising_loss(Oracle(wrong), schedule, latents, None, noise, t)), 9.0,
                        rel_tol=1e-5)


def test_tag_shuffle_keeps_the_first_tags_and_every_tag():
    caption = "zkpastel, two red circles, a blue square, on green, small"
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        out = shuffled_tags(caption, 1, rng)
        assert out.startswith("zkpastel, ")
        assert Counter(out.split(", ")) == Counter(caption.split(", "))
        seen.add(out)
    assert len(seen) > 10  # the order really changes
    assert shuffled_tags(caption, 5, rng) == caption  # all kept


def test_dataset_shuffles_tags_reproducibly_and_drops_style_captions_at_the_asked_rate():
    scan = scan_dataset(TOY_DATA / "pastel")
    tags = "zkpastel, red circle, blue square, green background, two shapes"
    samples = [replace(s, caption=tags) for s in scan.samples] * 8  # 256 items, 5 tags each
    a = ImageCaptionDataset(samples, 64, seed=3, shuffle_tags=True, keep_tokens=1)
    b = ImageCaptionDataset(samples, 64, seed=3, shuffle_tags=True, keep_tokens=1)
    first = [a._caption(i) for i in range(len(a))]
    assert first == [b._caption(i) for i in range(len(b))]  # same seed, epoch, index: same order
    assert all(c.startswith("zkpastel") for c in first)
    a.set_epoch(1)
    assert first != [a._caption(i) for i in range(len(a))]
    data = load_config(None, ["data.caption_dropout=0.25"]).data
    dropped = ImageCaptionDataset(style_samples(data, scan) * 8, 64, seed=3)
    share = [dropped._caption(i) for i in range(len(dropped))].count("") / len(dropped)
    assert 0.17 < share < 0.33, share
    assert all(s.caption_dropout == 0 for s in style_samples(load_config(None).data, scan))


def test_zero_terminal_snr_makes_the_last_step_pure_noise_and_min_snr_stays_finite():
    from diffusers import PNDMScheduler

    from sd_lora.objective import zero_terminal_snr_scheduler

    for prediction in ("epsilon", "v_prediction"):
        plain = PNDMScheduler(**sd1_scheduler_config(prediction))  # has no rescale option
        rescaled = zero_terminal_snr_scheduler(plain)
        assert rescaled.config.rescale_betas_zero_snr and rescaled.config.timestep_spacing == "trailing"
        schedule = training_schedule(rescaled.config, prediction)
        assert float(schedule.alphas_cumprod[-1]) == 0.0  # SNR 0: x_T is the noise itself
        assert float(training_schedule(plain.config, prediction).alphas_cumprod[-1]) > 1e-3
        t = torch.tensor([0, 500, 999])
        weights = min_snr_weights(schedule, t, 5.0)
        assert torch.isfinite(weights).all()
        assert float(weights[-1]) == (1.0 if prediction == "epsilon" else 0.0)


@pytest.mark.slow
def test_a_zero_terminal_snr_run_trains_samples_and_says_so(tmp_path):
    from pathlib import Path

    from safetensors import safe_open

    from sd_lora.train.recipe import train

    data = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"
    config = load_config(None, [
        'model.base="tiny"', f'data.path="{data}"', f'train.output_dir="{tmp_path}"',
        "train.name=z", "train.max_steps=3", "train.batch_size=2", "train.checkpoint_every=0",
        "sample.every=0", "sample.steps=2", "report.enabled=false", "train.min_snr_gamma=5",
        "train.zero_terminal_snr=true", 'model.prediction_type="v_prediction"',
        "train.eval_images=2",
    ])
    result = train(config, show_progress=False)
    assert math.isfinite(result.eval_loss_after)
    with safe_open(str(result.adapter_files["kohya"]), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_zero_terminal_snr"] == "True"
    assert (tmp_path / "samples" / "final.png").is_file()


def test_debiased_weights_follow_sd_scripts_formula():
    from sd_lora.objective import debiased_weights

    t = torch.tensor([0, 10, 300, 999])
    for prediction in ("epsilon", "v_prediction"):
        schedule = training_schedule(sd1_scheduler_config(), prediction)
        a = schedule.alphas_cumprod[t].double()
        snr = (a / (1 - a)).clamp(max=1000)
        want = 1 / snr.sqrt() if prediction == "epsilon" else 1 / (snr + 1)
        torch.testing.assert_close(debiased_weights(schedule, t).double(), want, rtol=1e-5, atol=0)
    assert float(debiased_weights(training_schedule(sd1_scheduler_config(), "epsilon"),
                                  torch.tensor([0]))) == pytest.approx(1 / math.sqrt(1000))


def test_adaptive_offset_grows_with_each_channels_mean():
    from sd_lora.objective import add_noise_offset

    latents = torch.zeros(2, 4, 8, 8)
    latents[0, 1] = 3.0  # image 0, channel 1 has mean 3
    noise = torch.zeros(2, 4, 8, 8)
    g, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = add_noise_offset(noise, 0.1, g, latents=latents, adaptive=0.5)
    shift = torch.randn(2, 4, 1, 1, generator=ref)
    scale = torch.full((2, 4, 1, 1), 0.1)
    scale[0, 1] = 0.1 + 0.5 * 3.0
    torch.testing.assert_close(got, (scale * shift).expand(2, 4, 8, 8))
    with pytest.raises(ConfigError, match="adaptive_noise_scale needs train.noise_offset"):
        load_config(None, ["train.adaptive_noise_scale=0.5"])


def test_multires_noise_has_unit_variance_and_more_low_frequency():
    from sd_lora.objective import add_multires_noise

    g = torch.Generator().manual_seed(0)
    white = torch.randn(64, 4, 32, 32, generator=g)
    pyramid = add_multires_noise(white.clone(), 6, 0.4, torch.Generator().manual_seed(1))
    assert float(pyramid.std()) == pytest.approx(1.0, abs=1e-4)
    # The mean over each 32x32 map (the lowest frequency) varies more than white noise's
    # (measured: 2.3x at 6 iterations, discount 0.4).
    assert float(pyramid.mean(dim=(2, 3)).std()) > 1.5 * float(white.mean(dim=(2, 3)).std())
    again = add_multires_noise(white.clone(), 6, 0.4, torch.Generator().manual_seed(1))
    assert torch.equal(pyramid, again)  # from the generator alone
    assert torch.equal(add_multires_noise(white, 0, 0.4, g), white)  # off


@pytest.mark.slow
def test_noise_and_weighting_options_train_resume_exactly_and_are_recorded(tmp_path, monkeypatch):
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    from sd_lora.train.recipe import train
    from tests.lora_helpers import killed_then_resumed

    data = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"

    def job(out):
        return load_config(None, [
            'model.base="tiny"', f'data.path="{data}"', f'train.output_dir="{out}"', "train.name=n",
            "train.max_steps=6", "train.batch_size=2", "train.checkpoint_every=0", "sample.every=0",
            "sample.steps=2", "report.enabled=false", 'export.dtype="fp32"', "train.learning_rate=1e-3",
            "train.noise_offset=0.05", "train.adaptive_noise_scale=0.2",
            "train.multires_noise_iterations=6", "train.multires_noise_discount=0.3",
            "train.debiased_estimation=true",
        ])

    straight = train(job(tmp_path / "a"), show_progress=False)
    resumed = killed_then_resumed(job(tmp_path / "b"), monkeypatch)
    a, b = load_file(straight.adapter_files["kohya"]), load_file(resumed.adapter_files["kohya"])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    with safe_open(str(resumed.adapter_files["kohya"]), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_multires_noise_iterations"] == "6" and metadata["ss_debiased_estimation"] == "True"
    assert metadata["ss_adaptive_noise_scale"] == "0.2"


def test_sample_enabled_false_renders_no_sample_image_and_still_exports(tmp_path):
    from pathlib import Path

    from sd_lora.train.recipe import train

    data = Path(__file__).resolve().parent.parent / "datasets" / "sample_stripes"
    config = load_config(None, [
        'model.base="tiny"', f'data.path="{data}"', f'train.output_dir="{tmp_path}"',
        "train.name=quiet", "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=0",
        "sample.every=1", "sample.enabled=false", "report.enabled=false",
    ])
    result = train(config, show_progress=False)
    assert result.adapter_files["kohya"].is_file()
    assert not (tmp_path / "samples").exists()  # neither the step-1 grid nor the final one
    assert "samples" not in __import__("json").loads((tmp_path / "timing.json").read_text())["phases_s"]
