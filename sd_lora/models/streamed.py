"""A diffusers folder's models read one tensor at a time, straight into the training dtype.

Why: diffusers and transformers read a .safetensors file through a memory map. Every page they
touch stays resident until the whole state dict is dropped, so loading the full SD 1.5 UNet
(a 3.4 GB fp32 file) in bf16 held the mapped fp32 file and the bf16 copy at once: the process
peaked at 5.6 GiB, twice what it then trains in (2.9 GiB). Here each tensor is copied (and
cast) out of the map and its pages are let go before the next one: the peak is the loaded
model plus one tensor. The file's pages stay in the page cache, which is not the process's
memory.

Only what can be checked is read this way: a component with a config.json and its weights in
one .safetensors file or a sharded set with its index, whose keys are exactly the model's (or
are all under one prefix the model leaves out: transformers 5's CLIPTextModel has no
"text_model." level, and its loader drops it the same way).
Anything else (other key names, .bin weights, custom classes) returns None and the caller lets
diffusers load that component as before.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights

# safetensors' dtype names (its format spec) -> torch's
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    # fp8 weights (SD3 files with a "t5xxlfp8" text encoder): read and cast up like the rest
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# The weights file names of each library, single and sharded (diffusers' and transformers' own).
WEIGHTS_FILES = {
    "diffusers": "diffusion_pytorch_model.safetensors",
    "transformers": "model.safetensors",
}


def read_tensors_as(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one .safetensors file, each a copy of its own; floating-point ones cast
    to `dtype` when given. The file is mapped, and each tensor's pages are let go (madvise
    DONTNEED) once it is copied: at most one tensor of the file is resident besides the result.
    Reading into buffers instead took 3x as long (2.5 s against 0.8 s for the SD 1.5 UNet)."""
    return dict(iter_tensors_as(path, dtype))


def iter_tensors_as(path: Path, dtype: torch.dtype | None = None,
                    select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the tensors of one .safetensors file that `select` accepts (all by
    default), in file order, each copied (and cast) as in `read_tensors_as`; the caller places
    each one before asking for the next, so the file is never held twice."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
        start = 8 + header_size
        wanted = {k: e for k, e in header.items()
                  if k != "__metadata__" and (select is None or select(k))}
        unknown = sorted({e["dtype"] for e in wanted.values()} - SAFETENSORS_DTYPES.keys())
        if unknown:
            raise ValueError(f"{path}: tensors of dtype {unknown} are not read here")
        # ACCESS_COPY: writable for torch.frombuffer, and private: the file is never written.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            for name, entry in wanted.items():
                begin, end = (start + offset for offset in entry["data_offsets"])
                if end > len(mapped):
                    raise ValueError(f"{path}: tensor {name} ends past the end of the file")
                file_dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                count = (end - begin) // file_dtype.itemsize
                view = (torch.frombuffer(mapped, dtype=file_dtype, count=count, offset=begin)
                        if count else torch.empty(0, dtype=file_dtype))
                cast = dtype is not None and view.is_floating_point() and view.dtype != dtype
                tensor = (view.to(dtype) if cast else view.clone()).reshape(entry["shape"])
                del view
                if end > begin:
                    page = begin - begin % mmap.PAGESIZE
                    mapped.madvise(mmap.MADV_DONTNEED, page, end - page)
                yield name, tensor


def weight_files(folder: Path, library: str) -> list[Path] | None:
    """The component's .safetensors files (one, or the shards its index names); None if
    it has neither."""
    single = folder / WEIGHTS_FILES[library]
    if single.is_file():
        return [single]
    index = folder / f"{WEIGHTS_FILES[library]}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    return None


def load_component(folder: Path, library: str, class_name: str,
                   dtype: torch.dtype) -> torch.nn.Module | None:
    """The model in `folder` (a pipeline's subfolder) in `dtype`, read tensor by tensor; None
    when it cannot be read this way with certainty (then let diffusers load it)."""
    if library not in WEIGHTS_FILES or not (folder / "config.json").is_file():
        return None
    files = weight_files(folder, library)
    if files is None:
        return None
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name, None)
        if cls is None:
            return None
        with init_empty_weights():
            model = cls.from_config(cls.load_config(folder))
        model.register_to_config(_name_or_path=str(folder))  # as from_pretrained records it
    else:
        import transformers

        cls = getattr(transformers, class_name, None)
        if cls is None:
            return None
        config = transformers.AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            model = cls._from_config(config)
    expected = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_tensors_as(file, dtype))
    state = keys_as_model(state, expected)
    if state is None:  # renamed or extra keys: the libraries' own loaders convert them
        return None
    model.load_state_dict(state, strict=True, assign=True)
    return cast_buffers(model, dtype).eval()


def cast_buffers(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Buffers made in __init__ (not in the file) are real and fp32: cast them as the rest
    (by hand: diffusers' ModelMixin.to(dtype) logs a warning on every call)."""
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                module._buffers[key] = buffer.to(dtype)
    return model


def keys_as_model(state: dict[str, torch.Tensor],
                  expected: set[str]) -> dict[str, torch.Tensor] | None:
    """`state` with the model's key names: as it is, or with the one first-level prefix that
    every key has removed, when that gives exactly `expected`; else None."""
    if set(state) == expected:
        return state
    prefixes = {key.split(".", 1)[0] for key in state}
    if len(prefixes) == 1:
        cut = len(prefixes.pop()) + 1
        stripped = {key[cut:]: tensor for key, tensor in state.items()}
        if set(stripped) == expected:
            return stripped
    return None


def streamed_components(folder: Path, dtype: torch.dtype,
                        skip: tuple[str, ...] = ()) -> dict[str, torch.nn.Module]:
    """{component name: model} for the models of a diffusers pipeline folder that
    `load_component` can read, except those named in `skip`; pass them to the pipeline's
    from_pretrained, which then loads only the rest (scheduler, tokenizers, any component
    left out here)."""
    index = json.loads((folder / "model_index.json").read_text())
    models = {}
    for name, entry in index.items():
        if name.startswith("_") or name in skip or not isinstance(entry, list) or len(entry) != 2:
            continue
        library, class_name = entry
        if library in WEIGHTS_FILES and (folder / name).is_dir():
            model = load_component(folder / name, library, class_name, dtype)
            if model is not None:
                models[name] = model
    return models
