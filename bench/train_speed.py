"""LoRA training throughput and peak memory, through the project's own training code.

    .venv/bin/python bench/train_speed.py                  # tiny (64 px) and SD 1.5 (256 px)
    .venv/bin/python bench/train_speed.py --only tiny --json /tmp/speed.json
    .venv/bin/python bench/train_speed.py --only sdxl --precision bf16   # SDXL, 512 px
    .venv/bin/python bench/train_speed.py --only sd35m    # SD3.5 Medium, 512 px, bf16, cached

Bases: the built-in `tiny` pipeline, the full SD 1.5 architecture (UNet, CLIP ViT-L text
encoder, VAE) and the full SDXL base architecture (UNet, CLIP ViT-L and OpenCLIP ViT-bigG, VAE;
only with --only sdxl, it is slow on a CPU) and the full SD3.5 Medium transformer (MMDiT-X,
2.5B parameters) with SD3's 16-channel VAE (only with --only sd35m: bf16, cached text
embeddings, as SD3 is trained on a CPU at all), built with random weights from the bundled configs;
speed does not depend on the weight values, and nothing is downloaded. For each base it measures fp32 and bf16 (fp16 too when
CUDA is present), with and without gradient checkpointing, and two kinds of step:

- "full": `TrainingLoop.train_micro_batch` as the trainer runs it: VAE encode of the images,
  text-encoder forward, UNet + text-encoder LoRA step;
- "cached": what latent and text-embedding caching would leave: `denoising_loss`, backward and
  optimizer step on precomputed latents and embeddings, UNet-only LoRA (text encoder frozen).

Each configuration runs in its own subprocess (`--one SPEC`) so its peak memory is its own and its
failure is only its own row. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_lora.config import JobConfig, LoraConfig, ModelConfig, TrainConfig
from sd_lora.lora.inject import lora_parameters
from sd_lora.models.families import denoiser_name, freeze, prediction_type_of
from sd_lora.models.text import (
    SD3_T5_TOKENS,
    Conditioning,
    default_time_ids,
    encode_all,
    text_encoders_of,
    tokenize_all,
    tokenizers_of,
)
from sd_lora.models.tokenizers import clip_tokenizer, open_clip_tokenizer
from sd_lora.objective import Objective, training_schedule
from sd_lora.train.loop import RunSetup, Trainee, TrainingLoop
from sd_lora.train.recipe import (
    add_adapters,
    enable_gradient_checkpointing,
    load_frozen_base,
    make_lr_scheduler,
    make_optimizer,
)
from sd_lora.util.dtypes import weight_dtype

RESULT_TAG = "BENCH_RESULT "  # the child's one line of stdout that the parent reads
DEFAULT_RESOLUTION = {"tiny": 64, "sd15": 256, "sdxl": 512, "tiny-sd3": 64, "sd35m": 512}
DEFAULT_STEPS = {"tiny": 20, "sd15": 3, "sdxl": 2, "tiny-sd3": 10, "sd35m": 2}
BATCH_SIZE = {"tiny": 4, "sd15": 1, "sdxl": 1, "tiny-sd3": 4, "sd35m": 1}
# SD3 on a CPU: bf16 and the cached step only (T5-XXL alone is 4.7B parameters, 9.5 GB in bf16:
# its outputs are what an SD3 run caches); its text conditioning is random, shaped as SD3's.
CACHED_ONLY = {"sd35m": "bf16"}
LORA = dict(unet_r=16, unet_alpha=16.0, unet_targets=("attn",),
            text_encoder_r=8, text_encoder_alpha=8.0, text_encoder_targets=("attn",))
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # our label -> Accelerate's
CAPTION = "a photo of a red bicycle leaning against a brick wall, soft evening light"
CONFIGS = Path(__file__).resolve().parent.parent / "sd_lora/assets/configs"
SD15_CONFIGS = CONFIGS / "stable-diffusion-v1-5"
SDXL_CONFIGS = CONFIGS / "stable-diffusion-xl-base-1.0"
SD35M_CONFIGS = CONFIGS / "stable-diffusion-3.5-medium"
SD3_VAE = dict(  # SD3's VAE: SD's encoder and decoder with 16 latent channels, no quant convs
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=16, norm_num_groups=32, scaling_factor=1.5305,
    shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
CACHING_NOTE = ("'full' is the step without caches; 'cached' the step with data.cache_latents and "
                "data.cache_text_encoder_outputs (text encoders frozen).")


@dataclass(frozen=True)
class Case:
    base: str  # "tiny" | "sd15"
    resolution: int  # pixels
    precision: str  # "fp32" | "bf16" | "fp16"
    checkpointing: bool
    cached: bool
    batch: int
    steps: int  # timed steps, after one warm-up step

    def label(self) -> str:
        return (f"{self.base} {self.resolution}px {self.precision} "
                f"ckpt={'on' if self.checkpointing else 'off'} "
                f"{'cached' if self.cached else 'full'} batch={self.batch} steps={self.steps}")


# --- the child: one configuration ------------------------------------------------------------


def run_one(case: Case) -> dict:
    """Build, set up and time one configuration in this process; returns figures for its row."""
    started = time.perf_counter()
    # As train.make_accelerator builds it, without trackers (nothing is logged here).
    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[case.precision])
    pipe = build_base(case.base, case.precision, accelerator.device)
    loop = make_training_loop(case, accelerator, pipe)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(case.batch, 3, case.resolution, case.resolution, generator=generator) * 2 - 1
    captions = [CAPTION] * case.batch
    step = cached_step(loop, pixels, captions) if case.cached else full_step(loop, pixels, captions)
    setup_s = time.perf_counter() - started
    setup_peak = peak_gib()
    reset_peak()  # train_peak counts the training steps only, not building the model
    with others_cpu() as others:
        seconds = time_steps(step, case.steps)
    train_peak = peak_gib()
    # The median, not the mean: on a shared CPU one step in a few can take several times longer
    # while another process holds a core; the JSON keeps every step's time.
    typical = statistics.median(seconds)
    return dict(setup_s=round(setup_s, 1), step_seconds=[round(s, 4) for s in seconds],
                s_per_step=typical, steps_per_s=1 / typical, mean_s_per_step=statistics.mean(seconds),
                min_s_per_step=min(seconds), peak_gib=max(setup_peak, train_peak),
                train_peak_gib=train_peak, others_cpu=others.get("cores"))


def build_base(base: str, precision: str, device):
    """A frozen pipeline in the trainer's dtypes: base weights in the training precision, VAE fp32."""
    if base in ("tiny", "tiny-sd3"):
        return load_frozen_base(ModelConfig(base=base), MIXED_PRECISION[precision], device)
    build = {"sdxl": build_sdxl_pipeline, "sd35m": build_sd35m_pipeline}.get(base, build_sd15_pipeline)
    pipe = freeze(build(precision))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def build_sd15_pipeline(precision: str):
    """SD 1.5's architecture with random weights, from the bundled configs (no download)."""
    def config(component: str) -> dict:
        return json.loads((SD15_CONFIGS / component / "config.json").read_text())

    # Built directly in the weight dtype, as from_pretrained(dtype=...) loads: building in fp32
    # and casting would put a 3.4 GB fp32 UNet into every bf16 row's peak memory.
    with default_dtype(weight_dtype(MIXED_PRECISION[precision])):
        unet = UNet2DConditionModel.from_config(config("unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder")))
    vae = AutoencoderKL.from_config(config("vae"))  # the trainer keeps the VAE in fp32
    scheduler_config = json.loads((SD15_CONFIGS / "scheduler/scheduler_config.json").read_text())
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=PNDMScheduler.from_config(scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sdxl_pipeline(precision: str):
    """SDXL base's architecture with random weights, from the bundled configs (no download)."""
    def config(component: str) -> dict:
        return json.loads((SDXL_CONFIGS / component / "config.json").read_text())

    with default_dtype(weight_dtype(MIXED_PRECISION[precision])):
        unet = UNet2DConditionModel.from_config(config("unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder")))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config("text_encoder_2")))
    # SDXL's text-encoder configs say torch_dtype float16, which transformers builds them in.
    text_encoder.to(weight_dtype(MIXED_PRECISION[precision]))
    text_encoder_2.to(weight_dtype(MIXED_PRECISION[precision]))
    vae = AutoencoderKL.from_config(config("vae"))
    scheduler_config = json.loads((SDXL_CONFIGS / "scheduler/scheduler_config.json").read_text())
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(), tokenizer_2=open_clip_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config), add_watermarker=False,
    )


def build_sd35m_pipeline(precision: str):
    """SD3.5 Medium's transformer and SD3's VAE with random weights, without text encoders (the
    cached step reads their outputs; see CACHED_ONLY)."""
    config = json.loads((SD35M_CONFIGS / "transformer" / "config.json").read_text())
    with default_dtype(weight_dtype(MIXED_PRECISION[precision])):
        transformer = SD3Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=AutoencoderKL(**SD3_VAE),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)


@contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def make_training_loop(case: Case, accelerator, pipe):
    """The trainer's own set-up steps (train.train, minus data, logging and checkpoints)."""
    config = JobConfig(
        lora=LoraConfig(**LORA, train_text_encoder=not case.cached),
        train=TrainConfig(batch_size=case.batch, max_steps=case.steps + 1,
                          mixed_precision=MIXED_PRECISION[case.precision],
                          gradient_checkpointing=case.checkpointing),
    )
    set_seed(0)
    trained = add_adapters(pipe, config.lora)
    if case.checkpointing:
        enable_gradient_checkpointing(trained)
    optimizer = make_optimizer(trained, config.train)
    lr_scheduler = make_lr_scheduler(optimizer, config.train, accelerator.num_processes)
    prepared = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    models = dict(zip(trained, prepared[: len(trained)]))
    optimizer, lr_scheduler = prepared[len(trained):]
    for model in models.values():
        model.train()  # as TrainingLoop.run; diffusers checkpoints only in training mode
    objective = Objective.from_config(
        config.train, training_schedule(pipe.scheduler.config, prediction_type_of(pipe)))
    return TrainingLoop(Trainee(pipe, trained, models, optimizer, lr_scheduler),
                        RunSetup(config, accelerator, objective, torch.Generator().manual_seed(0),
                                 case.resolution, []))


def full_step(loop, pixels, captions):
    """The step the trainer runs today: encode images and captions, then the LoRA update."""
    size = pixels.shape[-1]
    batch = {"pixel_values": pixels, "caption": captions,
             "loss_weight": torch.ones(len(captions)), "preserve": torch.zeros(len(captions), dtype=torch.bool),
             "time_ids": default_time_ids(len(captions), size, size)}
    return lambda: loop.train_micro_batch(batch)


def cached_step(loop, pixels, captions):
    """train_micro_batch without the VAE and text encoder: their outputs are computed once here."""
    trainee, setup = loop.trainee, loop.setup
    accelerator, unet = setup.accelerator, trainee.models[denoiser_name(trainee.pipe)]
    latents = loop.encode_images(pixels)  # (B, 4 or 16, H/8, W/8)
    if trainee.pipe.text_encoder is None:  # sd35m: SD3's conditioning, shaped (see CACHED_ONLY)
        embeddings = random_sd3_conditioning(trainee.pipe, len(captions), latents.dtype)
    else:
        with torch.no_grad():
            input_ids = tokenize_all(tokenizers_of(trainee.pipe), captions).to(accelerator.device)
            size = pixels.shape[-1]
            embeddings = encode_all(text_encoders_of(trainee.pipe), input_ids,  # (B, 77, 768 or 2048)
                                    default_time_ids(len(captions), size, size))

    def step() -> float:
        # Same order and extras (clipping, schedule) as train_micro_batch, so the difference
        # between the rows is only the encoders.
        with accelerator.accumulate(unet):
            noise, timesteps = setup.objective.draw(latents, setup.noise_generator)
            loss = setup.objective.loss(unet, latents, embeddings, noise, timesteps,
                                        setup.objective.weights(timesteps))
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(lora_parameters(unet), setup.config.train.max_grad_norm)
            trainee.optimizer.step()
            trainee.lr_scheduler.step()
            trainee.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # float() waits for the device, so the timing is complete

    return step


def random_sd3_conditioning(pipe, batch: int, dtype) -> Conditioning:
    """(B, 77 + 256, 4096) states and (B, 2048) pooled, as SD3's three encoders give them."""
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(batch, 77 + SD3_T5_TOKENS, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator)
    device = pipe.transformer.device
    return Conditioning(states.to(device, dtype), pooled.to(device, dtype), denoiser="transformer")


def time_steps(step, count: int) -> list[float]:
    """One untimed warm-up step (allocator, autocast caches, lazy inits), then `count` timed."""
    step()
    seconds = []
    for i in range(count):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
        print(f"    step {i + 1}/{count}: {seconds[-1]:.3f} s", file=sys.stderr, flush=True)
    return seconds


@contextmanager
def others_cpu():
    """Cores that everything but this process kept busy meanwhile (Linux): other jobs on a shared
    machine slow a CPU benchmark several-fold, so each row says how contended it was."""
    found: dict = {}
    busy, own, wall = _machine_busy_s(), time.process_time(), time.perf_counter()
    yield found
    if busy is not None:
        others = (_machine_busy_s() - busy) - (time.process_time() - own)
        found["cores"] = max(0.0, others / (time.perf_counter() - wall))


def _machine_busy_s() -> float | None:
    """CPU seconds all processes have used since boot, from /proc/stat's first line."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# --- memory: the whole process, and the training steps alone ----------------------------------


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets this process's peak RSS (VmHWM, and so ru_maxrss) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the training peak is the process's peak, an overestimate


def peak_gib() -> float:
    """Peak memory since the process started or since reset_peak: GPU allocations, or CPU RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child_main(spec: str) -> int:
    """Entry point of `--one`: print one tagged JSON line, with the figures or the error."""
    case = Case(**json.loads(spec))
    try:
        row = run_one(case)
    except Exception as exc:  # noqa: BLE001 - any failure belongs in this row of the table
        traceback.print_exc()
        row = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
    print(RESULT_TAG + json.dumps(row), flush=True)
    return 0


# --- the parent: every configuration, each in a subprocess -------------------------------------


def all_cases(args) -> list[Case]:
    precisions = ["fp32", "bf16"] + (["fp16"] if torch.cuda.is_available() else [])
    if args.precision:
        precisions = [args.precision]
    bases = [args.only] if args.only else ["tiny", "sd15"]
    return [
        Case(base, args.resolution or DEFAULT_RESOLUTION[base], precision, checkpointing, cached,
             BATCH_SIZE[base], args.steps or DEFAULT_STEPS[base])
        for base in bases
        for precision in ([CACHED_ONLY[base]] if base in CACHED_ONLY else precisions)
        for checkpointing in (False, True)
        for cached in ((True,) if base in CACHED_ONLY else (False, True))
    ]


def run_in_subprocess(case: Case, timeout_s: float) -> dict:
    """Run `--one` for the case; a crash, kill or timeout becomes this row's error."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(asdict(case))]
    # Offline: nothing may be downloaded. Quiet libraries: stderr is for progress.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    if done.returncode < 0:  # e.g. SIGKILL from the kernel's out-of-memory killer
        return {"error": f"killed by signal {-done.returncode}"}
    return {"error": f"exited with code {done.returncode} and no result"}


def markdown_table(rows: list[dict]) -> str:
    header = ("| base | resolution | precision | checkpointing | caching | batch | s/step | steps/s "
              "| best s/step | peak RSS GiB | train peak GiB | others' CPU |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        c = r["case"]
        start = (f"| {c['base']} | {c['resolution']} | {c['precision']} | "
                 f"{'on' if c['checkpointing'] else 'off'} | {'cached' if c['cached'] else 'full'} "
                 f"| {c['batch']} |")
        if "error" in r:
            lines.append(f"{start} failed: {r['error'].replace('|', '/')} | | | | | |")
            continue
        others = "" if r["others_cpu"] is None else f"{r['others_cpu']:.1f}"
        lines.append(f"{start} {r['s_per_step']:.3f} | {r['steps_per_s']:.2f} | "
                     f"{r['min_s_per_step']:.3f} | {r['peak_gib']:.2f} | "
                     f"{r['train_peak_gib']:.2f} | {others} |")
    return "\n".join(lines)


def machine() -> dict:
    return dict(python=platform.python_version(), torch=torch.__version__,
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def notes(meta: dict) -> str:
    memory = ("peak RSS = the configuration's whole process, building the model included "
              "(ru_maxrss; with CUDA, torch.cuda.max_memory_allocated instead); train peak = the "
              "same during the warm-up and timed steps only")
    return "\n".join([
        f"- {CACHING_NOTE}",
        f"- LoRA: UNet r={LORA['unet_r']} alpha={LORA['unet_alpha']:g} on attention; text "
        f"encoder r={LORA['text_encoder_r']} alpha={LORA['text_encoder_alpha']:g} on attention "
        f"('full' rows only); AdamW; batch size {BATCH_SIZE}; random pixels, one fixed caption.",
        "- bf16 = Accelerate mixed_precision='bf16' (CPU autocast), frozen base weights in bf16, "
        "VAE and LoRA weights in fp32; fp32 = mixed_precision='no'.",
        "- s/step = median of the timed steps after one warm-up step (mean, min and every step "
        "are in the JSON); steps/s = 1 / that; best = the fastest timed step; " + memory + ".",
        "- others' CPU = cores kept busy by other processes during the timed steps (of "
        f"{os.cpu_count()}); rows with more than ~0.2 were slowed by them.",
        f"- machine: {meta['machine']}; load average (1/5/15 min) before "
        f"{_loads(meta['load_before'])}, after {_loads(meta['load_after'])}.",
    ])


def _loads(loads) -> str:
    return " / ".join(f"{v:.2f}" for v in loads)


def run_all(args) -> tuple[list[dict], dict]:
    cases = all_cases(args)
    meta = dict(machine=machine(), load_before=os.getloadavg(), lora=LORA, note=CACHING_NOTE)
    rows = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.label()}", file=sys.stderr, flush=True)
        row = run_in_subprocess(case, args.timeout)
        rows.append({"case": asdict(case), **row})
        outcome = row.get("error") or (f"{row['s_per_step']:.3f} s/step, "
                                       f"peak {row['peak_gib']:.2f} GiB, "
                                       f"others' CPU {row['others_cpu'] or 0:.1f}")
        print(f"[{i}/{len(cases)}] -> {outcome}", file=sys.stderr, flush=True)
    meta["load_after"] = os.getloadavg()
    return rows, meta


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["tiny", "sd15", "sdxl", "tiny-sd3", "sd35m"],
                        help="run one base only (sdxl runs only when named here)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="one precision only")
    parser.add_argument("--steps", type=int, help="timed steps per configuration "
                        f"(default: {DEFAULT_STEPS})")
    parser.add_argument("--resolution", type=int, help="pixels, for every base "
                        f"(default: {DEFAULT_RESOLUTION})")
    parser.add_argument("--json", type=Path, help="also write the rows and machine info here")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds per configuration before it counts as failed")
    parser.add_argument("--one", metavar="SPEC", help=argparse.SUPPRESS)  # internal: the child
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: must be at least 1")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        parser.error(f"--resolution {args.resolution}: must be a positive multiple of 8")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        return child_main(args.one)
    rows, meta = run_all(args)
    print(markdown_table(rows))
    print()
    print(notes(meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
