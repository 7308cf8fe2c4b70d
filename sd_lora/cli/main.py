"""`sd-lora train | check | generate | inspect | convert | merge | resize | extract | app`: thin
argument parsing over the library."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from sd_lora.cli.tools import add_allow_pickle
from sd_lora.cli.tools import add_commands as add_tool_commands
from sd_lora.errors import UserError, exit_status

TRAIN_FLAGS = {  # command-line flag -> dotted config field
    "data": "data.path",
    "dataset_config": "data.dataset_config",
    "base": "model.base",
    "output": "train.output_dir",
    "name": "train.name",
    "max_steps": "train.max_steps",
    "resolution": "data.resolution",
    "mixed_precision": "train.mixed_precision",
    "seed": "train.seed",
}

FRONT_ENDS = "sd_lora.front_ends"  # entry-point group: the app registers its command here
APP_INSTALL = "install it with: pip install 'sd-lora[app]' (a source checkout: make setup)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # transformers warns at import that torchvision is absent; we never need it (set the
    # variable yourself to see every warning).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return exit_status(lambda: args.run(args))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default. argparse appends "(default: X)" where a flag has a
    value; a flag whose absence means something else (None, "", []) says what in its own
    help, as the config-backed train flags do (their default is the config's). Switches are
    off unless given."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default in ("", [])
        if unset or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-lora", description="Train and use Stable Diffusion LoRA adapters.",
                                     formatter_class=HelpFormatter)
    # Every subcommand (the tools' too) gets the formatter through parser_class.
    commands = parser.add_subparsers(
        dest="command", required=True,
        parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter))
    add_train_command(commands)
    add_generate_command(commands)
    insp = commands.add_parser("inspect", help="describe an adapter file (exit status 1: damaged)")
    insp.add_argument("path", type=Path)
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    add_allow_pickle(insp, "read a .pt/.ckpt adapter")
    insp.set_defaults(run=run_inspect)
    add_check_command(commands)
    add_tool_commands(commands)  # convert, merge, resize, extract
    add_app_command(commands)
    return parser


def config_default(dotted: str, meaning: str = "") -> str:
    """"(section.field; default: VALUE[, meaning])": a train flag's default is the config's."""
    from sd_lora.config import JobConfig

    section, field = dotted.split(".")
    value = getattr(getattr(JobConfig(), section), field)
    return f"({dotted}; default: {value}{', ' + meaning if meaning else ''})"


def add_train_command(commands) -> None:
    train = commands.add_parser("train", help="train a LoRA adapter on a folder of captioned images")
    train.add_argument("--config", type=Path,
                       help="a TOML job config (see examples/) (default: none, every field at its default)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override a config field, e.g. --set train.learning_rate=2e-4 "
                       "(repeatable; applied after the flags; default: none)")
    train.add_argument("--data", help="image folder " + config_default("data.path"))
    train.add_argument("--dataset-config", help="an sd-scripts dataset TOML instead of --data "
                       "(data.dataset_config; default: none)")
    train.add_argument("--base", help="toy | tiny | diffusers folder | hub id | model.safetensors "
                       + config_default("model.base"))
    train.add_argument("--output", help="run folder (train.output_dir; default: runs/NAME, or "
                       "runs/NAME-2, -3, ... when that holds another run; with --resume the latest)")
    train.add_argument("--name", help="adapter file name, without .safetensors (train.name; "
                       "default: the data folder's name)")
    train.add_argument("--max-steps", type=int, help="optimizer steps "
                       + config_default("train.max_steps", "the base's recommendation"))
    train.add_argument("--resolution", type=int, help="training size in pixels "
                       + config_default("data.resolution", "the base's native size"))
    train.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                       help="autocast type " + config_default("train.mixed_precision"))
    train.add_argument("--seed", type=int, help="LoRA initialisation, data order and noise "
                       + config_default("train.seed"))
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--allow-pickle", action="store_true",
                       help="open a .ckpt/.pt base (tensors only, through torch's weights-only loader)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=run_train)


def add_generate_command(commands) -> None:
    from sd_lora.generate.images import LORA_FORMS
    from sd_lora.models.schedulers import ALIASES, DEFAULT_SAMPLER, cli_sampler

    gen = commands.add_parser("generate", help="render images from a base with adapters")
    gen.add_argument("--base", default="toy", help="toy | tiny | diffusers folder | hub id | model.safetensors")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:W | :TE:UNET]",
                     help=f"an adapter and its strengths (repeatable): {LORA_FORMS}; "
                     "default: none, the base alone")
    gen.add_argument("--prompt", required=True, help="what to render")
    gen.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    gen.add_argument("--seed", type=int, default=0, help="the first image's seed")
    gen.add_argument("--steps", type=int, default=20, help="sampling steps")
    gen.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (CFG)")
    gen.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the base's own size)")
    gen.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the base's own size)")
    gen.add_argument("--sampler", default=cli_sampler(DEFAULT_SAMPLER),
                     help=f"{', '.join(ALIASES)} (the app's default too)")
    gen.add_argument("--count", type=int, default=1, help="images, with seeds seed, seed+1, ...")
    gen.add_argument("--output", type=Path, default=Path("out.png"),
                     help="PNG image file ('.png' is added to a name without an extension; "
                     "another extension is refused); with --count N, NAME-000.png, NAME-001.png, "
                     "...")
    gen.add_argument("--allow-pickle", action="store_true",
                     help="open .ckpt/.pt bases and adapters (tensors only, weights-only loader)")
    gen.set_defaults(run=run_generate)


def add_check_command(commands) -> None:
    check = commands.add_parser(
        "check", help="check a dataset (and a job config) before training: every problem at once")
    check.add_argument("data", nargs="?", help="image folder (default: the config's data.path)")
    check.add_argument("--config", type=Path,
                       help="a TOML job config to validate with it (default: none, the defaults)")
    check.add_argument("--dataset-config", help="an sd-scripts dataset TOML to check (default: none)")
    check.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override a config field (repeatable; default: none)")
    check.add_argument("--resolution", type=int, help="training resolution, warns below it "
                       "(default: the config's data.resolution)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(run=run_check)


def add_app_command(commands) -> None:
    app = commands.add_parser("app", help="open the browser app (Generate, Compare, Train)")
    app.add_argument("--adapters", type=Path, required=True,
                     help="adapters folder: listed for blending; finished trainings land here "
                     "(a training run folder works too: its checkpoints are not listed)")
    app.add_argument("--models", type=Path, help="base models: diffusers folders and .safetensors "
                     "checkpoints (default: none; the built-in bases and hub ids)")
    app.add_argument("--outputs", type=Path, help="generated images (default: outputs/ next to "
                     "--adapters; app/outputs/ inside it when it is a training run folder)")
    app.add_argument("--runs", type=Path, help="the app's training runs and uploads (default: runs/ "
                     "next to --adapters; app/runs/ inside it when it is a training run folder)")
    app.add_argument("--datasets", type=Path,
                     help="image folders to train on, read only; each subfolder is a dataset "
                     "(default: none; folders under the runs folder's datasets/, or an upload)")
    app.add_argument("--host", help="address to listen on (default: 127.0.0.1, this computer only)")
    app.add_argument("--port", type=int, help="port (default: 7860, or the next free one)")
    app.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    app.add_argument("--auth", metavar="USER:PASSWORD", help="ask for this login (default: none)")
    app.set_defaults(run=run_app)


def train_overrides(args: argparse.Namespace) -> list[str]:
    """Flags become `--set` overrides (applied before explicit --set ones)."""
    overrides = []
    for flag, dotted in TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{dotted}={value}" if not isinstance(value, str) else f'{dotted}="{_escape(value)}"')
    if getattr(args, "allow_pickle", False):
        overrides.append("model.allow_pickle=true")
    return overrides + list(args.set)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def run_train(args: argparse.Namespace) -> int:
    from sd_lora.config import load_config
    from sd_lora.train.recipe import train
    from sd_lora.train.stop_signals import stop_on_sigterm
    from sd_lora.util.malloc import keep_freed_memory
    from sd_lora.world.scorer import toy_style_scorer

    config = load_config(args.config, train_overrides(args))
    stop_on_sigterm()
    keep_freed_memory()  # this process trains, then exits
    result = train(config, resume=args.resume, show_progress=not args.no_progress,
                   style_scorer=toy_style_scorer())
    from sd_lora.util.processes import is_main_process

    if not is_main_process():  # the main process reports for all
        return 0
    from sd_lora.util.words import plural

    if result.eval_loss_before is None:
        print(f"\ntrained {plural(result.steps, 'step')} in {result.seconds:.0f} s (no evaluation "
              "loss: train.eval_images)")
    else:
        change = (result.eval_loss_after - result.eval_loss_before) / result.eval_loss_before
        # Which images: the report's style loss is on others (held out, when there are some).
        print(f"\ntrained {plural(result.steps, 'step')} in {result.seconds:.0f} s; loss on "
              f"{plural(result.eval_images, 'training image')} (fixed noise), before -> after: "
              f"{result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f} ({change:+.1%})")
    for fmt, path in result.adapter_files.items():
        print(f"adapter ({fmt}): {path}")
    samples = result.output_dir / "samples"
    shown = f"samples: {samples}   " if samples.is_dir() else ""  # none with sample.enabled false
    print(f"{shown}loss curve: {result.output_dir / 'loss.png'}")
    if result.report:
        from sd_lora.train.report_plot import verdict_lines

        print(f"quality report: {result.output_dir / 'report.png'} (figures in report.json)")
        for line in verdict_lines(result.report):
            print(f"  {line}")
    kohya = result.adapter_files.get("kohya")
    if kohya:
        print(f"try it in the browser: {app_command(config.model.base, kohya.parent)}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    """0: ready to train; 1: trainable, but files were skipped; 2: not trainable (the reason
    is printed, as for every user error)."""
    import json

    from sd_lora.config import load_config
    from sd_lora.train.preflight import check_job, with_dataset_config

    overrides = list(args.set)
    if args.data is not None:
        overrides.insert(0, f'data.path="{_escape(args.data)}"')
    if args.dataset_config is not None:
        overrides.insert(0, f'data.dataset_config="{_escape(args.dataset_config)}"')
    if args.resolution is not None:
        overrides.insert(0, f"data.resolution={args.resolution}")
    result = check_job(with_dataset_config(load_config(args.config, overrides)))
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.text())
    return 1 if result.skipped else 0


def app_command(base: str, adapters: Path) -> str:
    """The `sd-lora app` line that opens with this adapter and its base model available."""
    from sd_lora.models.bases import BUILTIN_BASES

    command = f"sd-lora app --adapters {_quote(str(adapters))}"
    local = Path(base).expanduser()
    if base not in BUILTIN_BASES and local.exists():
        command += f" --models {_quote(str(local.parent))}   (then choose base {local.name!r})"
    elif base not in BUILTIN_BASES:
        command += f"   (then enter base {base!r})"
    elif base != "toy":
        command += f"   (then choose base {base!r})"
    return command


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def run_generate(args: argparse.Namespace) -> int:
    from sd_lora.adapters.apply import apply_adapters, load_for
    from sd_lora.formats.metadata import short_hash
    from sd_lora.generate.images import generate_images, resolve_adapter_choice
    from sd_lora.generate.render import RenderSettings
    from sd_lora.models.families import native_resolution
    from sd_lora.models.load import load_pipeline
    from sd_lora.models.schedulers import set_pipeline_sampler

    # Before the model loads: a typo costs nothing.
    choices = [resolve_adapter_choice(text) for text in args.lora]  # each file found, or refused
    check_generate_args(args)
    pipe = load_pipeline(args.base, allow_pickle=args.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    sampler = set_pipeline_sampler(pipe, args.sampler)
    uses = [c.loaded(load_for(pipe, c.adapter, args.allow_pickle, c.name)) for c in choices]
    apply_adapters(pipe, uses)
    size = native_resolution(pipe)
    settings = RenderSettings(
        prompt=args.prompt, seed=args.seed, negative_prompt=args.negative_prompt,
        steps=args.steps, guidance_scale=args.guidance, width=args.width or size,
        height=args.height or size, sampler=sampler,
    )
    hashes = {u.name: short_hash(u.adapter) for u in uses}
    written = generate_images(pipe, settings, args.count, args.output, choices, hashes, args.base)
    for path in written:
        print(path)
    return 0


# `generate --output` names that ask for another image format (refused: it writes PNGs)
OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")

# diffusers' pipelines refuse other sizes (their check_inputs), after the model has loaded.
SIZE_MULTIPLE = 8


def check_generate_args(args: argparse.Namespace) -> None:
    """Every `generate` flag that would fail (or quietly write nothing) once the model has
    loaded, refused before it loads, naming the flag and its value."""
    import math

    from sd_lora.config import MAX_SEED
    from sd_lora.models.schedulers import sampler_name

    for flag, value in (("--steps", args.steps), ("--count", args.count)):
        if value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and (value < SIZE_MULTIPLE or value % SIZE_MULTIPLE):
            near = max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)
            raise UserError(f"{flag} {value} must be a positive multiple of {SIZE_MULTIPLE} "
                            f"(e.g. {near}); leave it out for the base's own size")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed {args.seed} must be from 0 to {MAX_SEED}")
    if not math.isfinite(args.guidance):
        raise UserError(f"--guidance {args.guidance} must be a finite number (7 is usual)")
    try:
        sampler_name(args.sampler)
    except ValueError as e:
        raise UserError(f"--sampler: {e}") from None
    if args.output.is_dir():
        raise UserError(f"--output {args.output} is a folder; name the image file, e.g. "
                        f"{args.output / 'out.png'}")
    args.output = png_output(args.output)


def png_output(path: Path) -> Path:
    """`generate` writes PNGs (their text chunk holds the parameters): "g6" becomes "g6.png"
    (the printed path shows it); "g6.jpg" is refused, naming the fix."""
    if path.suffix.lower() == ".png":
        return path
    if not path.suffix:
        return path.with_name(path.name + ".png")
    fixed = path.with_suffix(".png") if path.suffix.lower() in OTHER_IMAGE_SUFFIXES else (
        path.with_name(path.name + ".png"))
    raise UserError(f"--output {path}: generate writes PNG images (with their parameters in the "
                    f"file); name it {fixed}")


def run_inspect(args: argparse.Namespace) -> int:
    import json

    from sd_lora.adapters.inspect import format_inspection, inspect_adapter

    info = inspect_adapter(args.path, allow_pickle=args.allow_pickle)
    print(json.dumps(info, indent=2, default=str) if args.json else format_inspection(info))
    return 1 if info["damage"] else 0  # scripts that vet downloads can rely on the status


def run_app(args: argparse.Namespace) -> int:
    return app_launcher()(args)


def app_launcher():
    """The app's `run(args)`, found through its entry point: the library never imports the app,
    and an install without the `app` extra is told how to add it."""
    from importlib.metadata import entry_points
    from importlib.util import find_spec

    found = list(entry_points(group=FRONT_ENDS, name="app"))
    if not found:
        raise UserError(f"the browser app is not installed with this copy of sd-lora; {APP_INSTALL}")
    # Asked, not imported: the app imports gradio only once its temporary folders are set.
    if find_spec("gradio") is None:
        raise UserError(f"the browser app needs gradio, which is not installed; {APP_INSTALL}")
    try:
        return found[0].load()
    except ImportError as e:
        raise UserError(f"the browser app needs {e.name or 'gradio'}, which is not installed; "
                        f"{APP_INSTALL}") from None


if __name__ == "__main__":
    sys.exit(main())
