"""`sd-lora convert | merge | resize | extract`: adapter files in, adapter (or checkpoint) files
out, with what each step cost printed. Thin: the work is in `transforms` and `adapter_io`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from sd_lora.config import ExportDtype
from sd_lora.errors import UserError
from sd_lora.util.words import plural

EXPORT_DTYPES = get_args(ExportDtype)  # export.dtype's names, as the tools' --dtype


def add_commands(commands) -> None:
    convert = commands.add_parser("convert", help="rewrite an adapter in the kohya or diffusers layout")
    convert.add_argument("input", type=Path)
    convert.add_argument("output", type=Path)
    convert.add_argument("--to", choices=["kohya", "diffusers"], required=True)
    _dtype_flag(convert, default=None)
    add_allow_pickle(convert, "read a .pt/.ckpt adapter (the way to turn one into .safetensors)")
    convert.set_defaults(run=run_convert)

    merge = commands.add_parser("merge", help="combine adapters (or bake them into a base)")
    merge.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]")
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--rank", type=int, help="compress the sum to this rank (default: exact)")
    merge.add_argument("--into", metavar="BASE",
                       help="merge into this base and write a single-file checkpoint "
                       "(default: none, write an adapter)")
    merge.add_argument("--format", choices=["kohya", "diffusers"], default="kohya",
                       help="layout of the adapter written")
    _dtype_flag(merge, default="fp16")
    add_allow_pickle(merge, "read .pt/.ckpt adapters and a .ckpt --into base")
    merge.set_defaults(run=run_merge)

    resize = commands.add_parser(
        "resize", help="change an adapter's rank: fixed (--rank), or per module (--sv-*)")
    resize.add_argument("input", type=Path)
    resize.add_argument("--rank", type=int, help="the rank; with an --sv-* method the cap "
                        "(default there: each module's own rank)")
    how = resize.add_mutually_exclusive_group()
    how.add_argument("--sv-ratio", type=float, help="keep singular values >= largest / this "
                     "(default: none of the three: every module at --rank)")
    how.add_argument("--sv-fro", type=float, help="keep this share of the Frobenius norm (0-1) "
                     "(default: none, as above)")
    how.add_argument("--sv-cumulative", type=float, help="keep this share of the singular "
                     "values' sum (default: none, as above)")
    resize.add_argument("--out", type=Path, required=True)
    resize.add_argument("--verbose", action="store_true", help="one line per module")
    _dtype_flag(resize, default="fp16")
    add_allow_pickle(resize, "read a .pt/.ckpt adapter")
    resize.set_defaults(run=run_resize)

    extract = commands.add_parser("extract", help="a LoRA from the difference of two checkpoints")
    extract.add_argument("--base", required=True)
    extract.add_argument("--tuned", required=True)
    extract.add_argument("--rank", type=int, required=True)
    extract.add_argument("--conv", action="store_true", help="also the ResNet 3x3 convolutions")
    extract.add_argument("--min-diff", type=float, default=1e-4,
                         help="skip layers whose difference is below this share of the largest")
    extract.add_argument("--out", type=Path, required=True)
    _dtype_flag(extract, default="fp16")
    add_allow_pickle(extract, "read .ckpt checkpoints")
    extract.set_defaults(run=run_extract)


def add_allow_pickle(parser, what: str) -> None:
    """The one opt-in flag for pickled files, on every command that reads a model or adapter
    file, so the refusal's advice ("pass --allow-pickle") holds wherever it is printed."""
    parser.add_argument("--allow-pickle", action="store_true",
                        help=f"{what}: tensors only, through torch's weights-only loader; only "
                        "for files you trust")


def _dtype_flag(parser, default: str | None) -> None:
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default=default,
                        help="tensor type written" + ("" if default else " (default: as read)"))


def _torch_dtype(name: str | None, like=None):
    from sd_lora.util.dtypes import DTYPES as TORCH_DTYPES

    if name is None:  # as the source stored it
        return like if like in TORCH_DTYPES.values() else TORCH_DTYPES["fp32"]
    return TORCH_DTYPES[name]


def run_convert(args: argparse.Namespace) -> int:
    from sd_lora.adapters.files import adapter_from_tensors, read_tensors, save_adapter

    tensors, metadata = read_tensors(args.input, args.allow_pickle)
    state = adapter_from_tensors(tensors, metadata, source=args.input)
    stored = tensors[min(tensors)].dtype  # the first tensor's, as the file lists them
    out = save_adapter(state, args.output, format=args.to, dtype=_torch_dtype(args.dtype, stored))
    print(f"{args.input} -> {out} ({args.to}, {plural(state.count(), 'module')})")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from sd_lora.adapters.files import load_adapter, save_adapter
    from sd_lora.generate.images import resolve_adapter_choice

    choices = [resolve_adapter_choice(text, "adapter") for text in args.adapters]
    for c in choices:
        if c.unet != c.text_encoder:
            raise UserError(f"{c.adapter}: merge takes one weight per adapter (FILE:WEIGHT)")
    if args.into:
        return _merge_into_base(args, choices)
    from sd_lora.adapters.transforms import merge, summary

    weighted = [(load_adapter(c.adapter, allow_pickle=args.allow_pickle), c.unet)
                for c in choices]
    merged, reports = merge(weighted, rank=args.rank)
    out = save_adapter(merged, args.out, format=args.format, dtype=_torch_dtype(args.dtype))
    how = "exact (ranks concatenated)" if args.rank is None else f"compressed to rank {args.rank}"
    print(f"merged {plural(len(choices), 'adapter')}, {how}: {summary(reports)}")
    print(out)
    return 0


def _merge_into_base(args, choices) -> int:
    from sd_lora.adapters.apply import apply_adapters, load_for
    from sd_lora.models.load import load_pipeline
    from sd_lora.models.single_file import save_single_file

    pipe = load_pipeline(args.into, allow_pickle=args.allow_pickle)
    applied = apply_adapters(pipe, [c.loaded(load_for(pipe, c.adapter, args.allow_pickle, c.name))
                                    for c in choices])
    out = save_single_file(pipe, args.out, _torch_dtype(args.dtype))
    matched = sum(sum(c.values()) for c in applied.coverage) if applied.coverage else 0
    print(f"merged {plural(len(choices), 'adapter')} into {args.into} "
          f"({plural(matched, 'layer')} changed)")
    print(out)
    return 0


def run_resize(args: argparse.Namespace) -> int:
    from sd_lora.adapters.files import load_adapter, save_adapter
    from sd_lora.adapters.transforms import resize, summary

    method, value = next(((m, v) for m, v in (("sv_ratio", args.sv_ratio), ("sv_fro", args.sv_fro),
                                              ("sv_cumulative", args.sv_cumulative)) if v is not None),
                         (None, None))
    if method is None and args.rank is None:  # before the file is read
        raise UserError("resize needs a target: --rank N (every module to rank N), or one of "
                        "--sv-ratio, --sv-fro, --sv-cumulative (a rank per module from its "
                        "singular values, capped by --rank if given)")
    state = load_adapter(args.input, allow_pickle=args.allow_pickle)
    resized, reports = resize(state, args.rank, method, value)
    out = save_adapter(resized, args.out, dtype=_torch_dtype(args.dtype))
    if args.verbose:
        for r in reports:
            print(f"  {r.component} {r.path}: rank {r.rank_before} -> {r.rank_after}, "
                  f"energy kept {r.energy_kept:.2%}")
    print(f"resized: {summary(reports)}")
    print(out)
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from sd_lora.adapters.extract import weight_differences
    from sd_lora.adapters.files import save_adapter
    from sd_lora.adapters.transforms import from_differences, summary
    from sd_lora.models.load import load_pipeline

    base, tuned = (load_pipeline(b, allow_pickle=args.allow_pickle) for b in (args.base, args.tuned))
    family, differences = weight_differences(base, tuned, conv=args.conv)
    state, reports = from_differences(family, differences, args.rank, args.min_diff)
    state.metadata["ss_output_name"] = args.out.stem
    out = save_adapter(state, args.out, dtype=_torch_dtype(args.dtype))
    total = sum(len(m) for m in differences.values())
    print(f"extracted {len(reports)} of {plural(total, 'layer')} (the rest differ by less than "
          f"{args.min_diff:g} of the largest): {summary(reports)}")
    print(out)
    return 0
