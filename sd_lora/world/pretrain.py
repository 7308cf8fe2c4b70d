"""Pretrain the built-in `toy` base on the toy world, with this project's objective and a CPU.

    python -m sd_lora.world.pretrain --work runs/toy-pretrain          # all stages, ~45 min, 2 cores
    python -m sd_lora.world.pretrain --work runs/toy-pretrain --install  # then copy it into the package

Recipe (every number is a flag; the defaults are what built the shipped model):
1. VAE: an AutoencoderKL (4x, 4 latent channels) trained as a plain autoencoder (MSE + L1, a
   KL term of 1e-6 as in SD) on 32 px random crops of 64 px scenes in every style: the VAE is the
   image codec, so like SD's VAE it has seen every kind of picture. Crops are 4x cheaper than
   whole images and the VAE is convolutional. Its scaling factor is set so that the latents of
   plain scenes have unit spread, as SD's 0.18215 does for its VAE.
2. UNet and text encoder, together from scratch, on the latents of plain scenes only (the styles
   are what LoRAs learn later): epsilon prediction on SD's noise schedule, min-SNR-5 loss weights
   (converges faster), 10% empty captions (for classifier-free guidance), AdamW with warm-up and
   cosine decay, and an exponential moving average of the weights, which is what ships; then a
   short fine-tune of those weights with offset noise (see Recipe.offset_noise). An optional
   third stage puts made-up words before half the captions (Recipe.unknown_words_steps; off
   in the shipped base).
3. Evaluation: prompt-following accuracy of the EMA model by `sd_lora.world.scorer`, written to
   recipe.json with the recipe and the time each stage took.

Each stage writes its result into --work and is skipped when that result is there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from sd_lora.models.builtin.tiny import sd1_scheduler_config
from sd_lora.models.builtin.toy import (
    TOY_RESOLUTION,
    toy_base_path,
    toy_text_encoder_config,
    toy_unet_config,
    toy_vae_config,
)
from sd_lora.models.text import tokenize
from sd_lora.models.tokenizers import clip_tokenizer
from sd_lora.objective import Objective, training_schedule
from sd_lora.util.atomic import atomic_folder
from sd_lora.world.scenes import caption, render, scene_at
from sd_lora.world.styles import STYLES

PRETRAIN_SEED = 1000  # scenes for pretraining; the shipped style datasets use seeds 0 and 1


@dataclass(frozen=True)
class Recipe:
    vae_images: int = 4096
    vae_steps: int = 4000
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_images: int = 24000
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 6e-4
    unet_warmup: int = 200
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    # Then a fine-tune with offset noise: SD's noise schedule leaves ~7% of the image at its
    # noisiest step, so a model trained on plain noise never learns to choose an image's overall
    # colour (a toy scene is mostly one flat background) and draws washed-out backgrounds.
    # Adding a per-channel constant to the noise (Guttenberg 2023) teaches it to.
    finetune_steps: int = 1500
    finetune_lr: float = 2e-4
    offset_noise: float = 0.1
    # Optional (off in the shipped base): a fine-tune (offset noise kept) where half the captions
    # start with 1-3 made-up words, "vrotem, qa, a red circle ...". Trained on captions that
    # always start at the first token, the text encoder reads a caption by position, so two
    # trigger words disturb it (the shipped base drew 5 of 8 backgrounds wrong after "zkpastel,
    # zkgolden, "); 1500 steps of this stage fix that (measured: docs/toy-world.md, blend section), but
    # style adapters trained on that base then barely show in generations, so it does not ship.
    unknown_words_steps: int = 0
    unknown_words_share: float = 0.5
    seed: int = 0


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(im, np.uint8) for im in images])).permute(
        0, 3, 1, 2
    )


def to_unit(batch_uint8: torch.Tensor) -> torch.Tensor:
    return batch_uint8.float() / 127.5 - 1.0


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- stage 1: the VAE ---------------------------------------------------------------------------


def vae_training_images(count: int) -> torch.Tensor:
    """Scenes in every style, styles taking turns (the same scene never in two styles)."""
    styles = list(STYLES.values())
    images = [
        render(scene_at(i, PRETRAIN_SEED), styles[i % len(styles)], TOY_RESOLUTION)
        for i in tqdm(range(count), desc="render VAE images", leave=False)
    ]
    return images_to_tensor(images)


def edge_loss(decoded: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L1 between the images' horizontal and vertical differences: pixel losses alone reward a
    blur (the mean of every sharp answer); this term pays for sharp edges, stripes and blocks."""
    def steps(x):
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    (dx, dy), (tx, ty) = steps(decoded), steps(images)
    return F.l1_loss(dx, tx) + F.l1_loss(dy, ty)


def train_vae(recipe: Recipe, out: Path) -> dict:
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    data = vae_training_images(recipe.vae_images)
    vae = AutoencoderKL(**toy_vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    crop = recipe.vae_crop
    losses = []
    bar = tqdm(range(recipe.vae_steps), desc="VAE")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, recipe.vae_steps, 100, recipe.vae_lr)
        index = torch.randint(0, len(data), (recipe.vae_batch,), generator=generator)
        y, x = torch.randint(0, TOY_RESOLUTION - crop + 1, (2,), generator=generator).tolist()
        images = to_unit(data[index, :, y : y + crop, x : x + crop])
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(decoded, images) + F.mse_loss(decoded, images)
        loss = loss + 0.5 * edge_loss(decoded, images) + recipe.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    vae.eval()
    held_out = images_to_tensor(
        render(scene_at(i, PRETRAIN_SEED + 1), style, TOY_RESOLUTION)
        for i in range(64)
        for style in STYLES.values()
    )
    with torch.no_grad():
        psnr, style_kept = {}, {}
        for k, name in enumerate(STYLES):
            images = to_unit(held_out[k :: len(STYLES)])
            decoded = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
            mse = F.mse_loss((decoded + 1) / 2, (images + 1) / 2).item()
            psnr[name] = round(10 * math.log10(1 / mse), 2)
            if name != "plain":  # does the style survive the round trip? (scores of ~1 do)
                from sd_lora.world.scorer import style_score

                pictures = ((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
                style_kept[name] = round(float(np.mean([style_score(p, name) for p in pictures])), 3)
        plain = to_unit(
            images_to_tensor(
                render(scene_at(i, PRETRAIN_SEED), STYLES["plain"], TOY_RESOLUTION)
                for i in range(512)
            )
        )
        spread = vae.encode(plain).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / spread, 5))
    vae.save_pretrained(out, safe_serialization=True)
    return {
        "final_loss": round(float(np.mean(losses[-100:])), 5),
        "psnr_db": psnr, "style_score_after_round_trip": style_kept,
        "scaling_factor": vae.config.scaling_factor,
    }


# --- stage 2: UNet and text encoder ---------------------------------------------------------------


def unet_training_set(
    vae: AutoencoderKL, count: int, tokenizer
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(latents already scaled, token ids, captions) of `count` plain scenes."""
    latents, ids, captions = [], [], []
    plain = STYLES["plain"]
    chunk = 256
    with torch.no_grad():
        for start in tqdm(range(0, count, chunk), desc="encode scenes", leave=False):
            scenes = [scene_at(i, PRETRAIN_SEED) for i in range(start, min(count, start + chunk))]
            images = to_unit(images_to_tensor(render(s, plain, TOY_RESOLUTION) for s in scenes))
            latents.append(vae.encode(images).latent_dist.mode() * vae.config.scaling_factor)
            captions += [caption(s, plain) for s in scenes]
            ids.append(tokenize(tokenizer, captions[start:]))
    return torch.cat(latents), torch.cat(ids), captions


TRIGGER_PREFIX = "zk"  # every toy style's trigger word starts so; made-up words never do


def made_up_words(rng: random.Random) -> str:
    """1-3 random lowercase words and commas ("vrotem, qa, "), none a toy trigger word."""
    words = []
    while len(words) < rng.randint(1, 3):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        if not word.startswith(TRIGGER_PREFIX):
            words.append(word)
    return "".join(f"{word}, " for word in words)


def with_unknown_words(captions: list[str], share: float, rng: random.Random) -> list[str]:
    """`share` of the captions (chosen at random) after made-up words."""
    return [made_up_words(rng) + c if rng.random() < share else c for c in captions]


STAGES = ("pretrain", "offset_noise", "unknown_words")


def train_unet(
    recipe: Recipe, vae: AutoencoderKL, out: Path, start: Path | None = None,
    stage: str = "pretrain",
) -> dict:
    """From scratch ("pretrain"), or a fine-tune of `start`'s weights: with offset noise
    ("offset_noise"), then with made-up words before captions too ("unknown_words")."""
    if stage not in STAGES or (start is None) != (stage == "pretrain"):
        raise ValueError(f"stage {stage!r} with start={start}: expected one of {STAGES}, "
                         "and a start file for every stage but pretrain")
    finetune = start is not None
    steps = {"pretrain": recipe.unet_steps, "offset_noise": recipe.finetune_steps,
             "unknown_words": recipe.unknown_words_steps}[stage]
    peak_lr = recipe.finetune_lr if finetune else recipe.unet_lr
    offset = recipe.offset_noise if finetune else 0.0
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed + 1 + STAGES.index(stage))
    words_rng = random.Random(recipe.seed)
    tokenizer = clip_tokenizer()
    latents, ids, captions = unet_training_set(vae, recipe.unet_images, tokenizer)
    empty_ids = tokenize(tokenizer, [""])[0]
    unet = UNet2DConditionModel(**toy_unet_config())
    text_encoder = CLIPTextModel(toy_text_encoder_config())
    models = torch.nn.ModuleList([unet, text_encoder])
    if finetune:
        models.load_state_dict(load_file(str(start)))
    ema = copy.deepcopy(models).requires_grad_(False)
    optimizer = torch.optim.AdamW(models.parameters(), lr=peak_lr, weight_decay=0.0)
    objective = Objective(training_schedule(sd1_scheduler_config(), "epsilon"),
                          noise_offset=offset,  # see Recipe.offset_noise
                          min_snr_gamma=recipe.min_snr_gamma)
    schedule = objective.schedule
    losses = []
    bar = tqdm(range(steps), desc={"pretrain": "UNet + text encoder",
                                   "offset_noise": "offset-noise fine-tune",
                                   "unknown_words": "unknown-words fine-tune"}[stage])
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, recipe.unet_warmup, peak_lr)
        index = torch.randint(0, len(latents), (recipe.unet_batch,), generator=generator)
        if stage == "unknown_words":
            batch_ids = tokenize(tokenizer, with_unknown_words(
                [captions[i] for i in index.tolist()], recipe.unknown_words_share, words_rng))
        else:
            batch_ids = ids[index].clone()
        dropped = torch.rand(recipe.unet_batch, generator=generator) < recipe.caption_dropout
        batch_ids[dropped] = empty_ids
        x0 = latents[index]
        noise, timesteps = objective.draw(x0, generator)
        noisy = schedule.add_noise(x0, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(batch_ids)[0]).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * objective.weights(timesteps)).mean()  # logged below unweighted
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        optimizer.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for kept, live in zip(ema.parameters(), models.parameters()):
                kept.lerp_(live, 1 - decay)
        losses.append(per_sample.mean().item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (step + 1) % 1000 == 0 or step + 1 == steps:
            save_file(ema.state_dict(), str(out.with_suffix(".partial.safetensors")))
    save_file(ema.state_dict(), str(out))
    return {"final_loss": round(float(np.mean(losses[-200:])), 5)}


def assemble(vae_dir: Path, models_file: Path) -> StableDiffusionPipeline:
    vae = AutoencoderKL.from_pretrained(vae_dir)
    unet = UNet2DConditionModel(**toy_unet_config())
    text_encoder = CLIPTextModel(toy_text_encoder_config())
    models = torch.nn.ModuleList([unet, text_encoder])
    models.load_state_dict(load_file(str(models_file)))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**sd1_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(torch.float32)


def save_pipeline(pipe: StableDiffusionPipeline, folder: Path, recipe_record: dict) -> None:
    """float16 diffusers folder with recipe.json, written to a temp folder then renamed."""
    with atomic_folder(folder) as tmp:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / "recipe.json").write_text(json.dumps(recipe_record, indent=2) + "\n")
    pipe.to(torch.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for stage results")
    parser.add_argument(
        "--install", action="store_true", help=f"copy the result to {toy_base_path()}"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--eval-prompts", type=int, default=90,
                        help="prompts for the prompt-following evaluation")
    for field, value in asdict(Recipe()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(**{k: getattr(args, k) for k in asdict(Recipe())})
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    log_file = work / "stages.json"
    log = json.loads(log_file.read_text()) if log_file.exists() else {}
    log["recipe"] = asdict(recipe)

    def run_stage(name: str, done: bool, fn) -> None:
        if done:
            print(f"{name}: already done in {work}")
            return
        start = time.perf_counter()
        result = fn()
        log[name] = {**result, "seconds": round(time.perf_counter() - start, 1)}
        log_file.write_text(json.dumps(log, indent=2) + "\n")
        print(f"{name}: {log[name]}")

    vae_dir, models_file = work / "vae", work / "unet_text_encoder_ema.safetensors"
    run_stage("vae", (vae_dir / "config.json").exists(), lambda: train_vae(recipe, vae_dir))
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    run_stage("unet", models_file.exists(), lambda: train_unet(recipe, vae, models_file))
    tuned_file = work / "unet_text_encoder_offset_noise_ema.safetensors"
    if recipe.finetune_steps:
        run_stage("offset_noise_finetune", tuned_file.exists(),
                  lambda: train_unet(recipe, vae, tuned_file, models_file, "offset_noise"))
        models_file = tuned_file
    words_file = work / "unet_text_encoder_unknown_words_ema.safetensors"
    if recipe.unknown_words_steps:
        run_stage("unknown_words_finetune", words_file.exists(),
                  lambda: train_unet(recipe, vae, words_file, models_file, "unknown_words"))
        models_file = words_file
    pipe = assemble(vae_dir, models_file)

    def evaluate() -> dict:
        from sd_lora.world.scorer import prompt_following_accuracy

        pipe.set_progress_bar_config(disable=True)
        plain = prompt_following_accuracy(pipe, count=args.eval_prompts)
        # Two style adapters' trigger words before every caption: a blend's prompts.
        after_triggers = prompt_following_accuracy(
            pipe, count=args.eval_prompts,
            prefix=f"{STYLES['pastel'].trigger}, {STYLES['golden'].trigger}, ")
        return {**plain, "after_two_trigger_words": after_triggers}

    run_stage("evaluation", "evaluation" in log, evaluate)
    save_pipeline(
        pipe,
        work / "toy",
        {
            "what": "the sd-lora toy base, pretrained by `python -m sd_lora.world.pretrain`",
            "cpu_threads": torch.get_num_threads(),
            **log,
        },
    )
    print(f"wrote {work / 'toy'}")
    if args.install:
        target = toy_base_path()
        with atomic_folder(target) as tmp:
            shutil.copytree(work / "toy", tmp, dirs_exist_ok=True)
        print(f"installed into {target}")
    return 0


if __name__ == "__main__":
    random.seed(0)
    sys.exit(main())
