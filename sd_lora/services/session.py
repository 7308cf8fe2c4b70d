"""A long-lived generation session for the app: one base in memory, adapters merged on demand.

    session = GenerationSession(workspace)
    images = session.generate(GenerateRequest(prompt="zkstripes, a circle", seed=1,
                                              adapters=(adapter_setting("style", 0.8, 0.8),)))

The base loads only when the request names another one; adapter files are read once (cached by
path, modification time and size) and merged with `apply_adapters(..., replace=previous)`, so
changing a strength costs a few milliseconds, never a reload. Every adapter is read and checked
against the base (family, layers) before anything renders. One lock serialises all model use, so
concurrent requests queue. With the same settings the pixels equal those of `sd-lora generate`.
"""

from __future__ import annotations

import math
import random
import re
import threading
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from sd_lora.adapters.apply import apply_adapters
from sd_lora.adapters.block_weights import (
    BlockWeightError,
    format_block_weights,
    parse_block_weights,
)
from sd_lora.adapters.files import (
    AdapterFileError,
    adapter_from_tensors,
    detect_family,
    pipeline_module_paths,
    read_safetensors,
)
from sd_lora.adapters.use import AdapterUse
from sd_lora.errors import UserError
from sd_lora.formats.adapter_state import AdapterState
from sd_lora.formats.metadata import file_hashes, short_hash
from sd_lora.generate.png_info import format_lora_tag
from sd_lora.generate.render import RenderSettings, a1111_parameters, image_grid, render, save_png
from sd_lora.models.families import model_family, native_resolution
from sd_lora.models.load import load_pipeline
from sd_lora.models.schedulers import DEFAULT_SAMPLER, sampler_name, set_pipeline_sampler
from sd_lora.services.workspace import Workspace, checkpoint_problem, resolve_base
from sd_lora.util.pickles import is_pickle

MAX_SEED = 2**32 - 1
MAX_GRID_CELLS = 100
ADAPTER_CACHE_SIZE = 16


class RequestError(UserError):
    """A request field out of range; the message names the field and the value."""


class AdapterLoadError(UserError):
    """An adapter file that cannot be used; the message names the adapter and the reason."""


class FamilyMismatchError(UserError):
    """An adapter trained for another base family than the loaded base."""


def _finite(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"{field} = {value!r} must be a finite number")
    return float(value)


def _int_in(value, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{field} = {value!r} must be a whole number from {low} to {high}")
    return value


def adapter_setting(name: str, unet: float = 1.0, te: float = 1.0,
                    blocks: str | tuple[float, ...] | None = None) -> AdapterUse[str]:
    """An app request's adapter: its name in the adapters folder (without .safetensors) and
    strengths, checked; `blocks` an LBW preset, 17 numbers, or their weights (None or "": every
    block at 1)."""
    if not isinstance(name, str) or not name.strip():
        raise RequestError(f"adapter name {name!r} is empty")
    _finite(unet, f"adapter {name!r}: unet strength")
    _finite(te, f"adapter {name!r}: text-encoder strength")
    weights = None
    if isinstance(blocks, tuple):
        weights = blocks
    elif blocks is not None and str(blocks).strip():
        try:
            weights = parse_block_weights(blocks)
        except BlockWeightError as e:
            raise RequestError(f"adapter {name!r}: blocks: {e}") from None
    return AdapterUse(name, unet, te, weights, name)


@dataclass(frozen=True)
class GenerateRequest:
    base: str = "tiny"
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1  # -1: a random seed
    steps: int = 20
    guidance: float = 7.0
    width: int = 0  # 0: the base's native size
    height: int = 0
    sampler: str = DEFAULT_SAMPLER
    batch_count: int = 1
    adapters: tuple[AdapterUse[str], ...] = ()  # each made by adapter_setting

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base.strip():
            raise RequestError(f"base = {self.base!r} must name a base model")
        for field in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, field), str):
                raise RequestError(f"{field} = {getattr(self, field)!r} must be text")
        if self.seed != -1:
            _int_in(self.seed, "seed", 0, MAX_SEED)
        _int_in(self.steps, "steps", 1, 150)
        if not 0 <= _finite(self.guidance, "guidance") <= 30:
            raise RequestError(f"guidance = {self.guidance!r} must be from 0 to 30")
        for field in ("width", "height"):
            value = getattr(self, field)
            if value != 0 and (_int_in(value, field, 64, 2048) % 8):
                raise RequestError(f"{field} = {value} must be a multiple of 8 (or 0: native)")
        _int_in(self.batch_count, "batch_count", 1, 100)
        try:
            sampler_name(self.sampler)
        except ValueError as e:
            raise RequestError(f"sampler: {e}") from None
        for item in self.adapters:
            if not (isinstance(item, AdapterUse) and isinstance(item.adapter, str)):
                raise RequestError(f"adapters: {item!r} is not an adapter_setting(...)")
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise RequestError(f"adapters: each adapter may appear once; got {names}")


@dataclass
class GeneratedImage:
    image: Image.Image
    path: Path
    parameters: str
    seed: int


class _Loaded(NamedTuple):
    key: tuple
    state: AdapterState
    short_hash: str


class GenerationSession:
    def __init__(self, workspace: Workspace, device: str = "cpu", dtype=torch.float32) -> None:
        self.workspace = workspace
        self.device = torch.device(device)
        self.dtype = dtype
        self._lock = threading.Lock()
        self._pipe = None
        self._base: str | None = None
        self._scheduler = None  # the base's own, restored before each sampler change
        self._applied = None
        self._adapters: dict[Path, _Loaded] = {}

    @property
    def loaded_base(self) -> str | None:
        return self._base

    @property
    def base_family(self) -> str | None:
        return None if self._pipe is None else model_family(self._pipe)

    # --- public operations -------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> list[GeneratedImage]:
        """Render `batch_count` images (seeds seed, seed+1, ...) and save them under outputs/."""
        with self._lock:
            pipe = self._prepare(request)
            entries = self._entries(request.adapters)
            self._merge(entries)
            seed = self._seed(request)
            results = []
            for i in range(request.batch_count):
                settings = self._settings(request, seed + i)
                image = render(pipe, settings)
                parameters = self._parameters(request, settings, entries)
                path = save_png(image, self._next_output_path(seed + i), parameters)
                results.append(GeneratedImage(image, path, parameters, seed + i))
            return results

    def compare(self, request: GenerateRequest) -> tuple[Image.Image, list[str]]:
        """One seed rendered without adapters, with each adapter alone, and with the blend."""
        if not request.adapters:
            raise RequestError("compare needs at least one adapter in the request")
        with self._lock:
            pipe = self._prepare(request)
            entries = self._entries(request.adapters)
            self._merge(entries)  # checks every adapter against the base before any render
            settings = self._settings(request, self._seed(request))
            variants = [("no adapters", [])]
            variants += [(f"{e.name} only ({_weights(e)})", [e]) for e in entries]
            if len(entries) > 1:
                variants.append(("blend: " + ", ".join(f"{e.name} {_weights(e)}" for e in entries),
                                 entries))
            images = []
            for _, chosen in variants:
                self._merge(chosen)
                images.append(render(pipe, settings))
            labels = [label for label, _ in variants]
            return image_grid(images, columns=len(images), labels=labels), labels

    def xy_grid(self, request: GenerateRequest, adapter: str, weights: list[float],
                seeds: list[int]) -> Image.Image:
        """Rows: seeds; columns: strengths of `adapter` (unet and text encoder alike)."""
        weights = [_finite(w, "xy weights") for w in weights]
        seeds = [_int_in(s, "xy seeds", 0, MAX_SEED) for s in seeds]
        if not weights or not seeds or len(weights) * len(seeds) > MAX_GRID_CELLS:
            raise RequestError(
                f"xy grid: {len(weights)} weights x {len(seeds)} seeds; give at least one of "
                f"each and at most {MAX_GRID_CELLS} cells"
            )
        settings_of = _with_adapter(request, adapter)
        with self._lock:
            pipe = self._prepare(request)
            columns = [self._entries(settings_of(w)) for w in weights]  # all checked up front
            cells: dict[tuple[int, int], Image.Image] = {}
            for col, entries in enumerate(columns):
                self._merge(entries)
                for row, seed in enumerate(seeds):
                    cells[(row, col)] = render(pipe, self._settings(request, seed))
            order = [(r, c) for r in range(len(seeds)) for c in range(len(weights))]
            labels = [f"seed {seeds[r]}, {adapter} {weights[c]:g}" for r, c in order]
            return image_grid([cells[k] for k in order], columns=len(weights), labels=labels)

    # --- steps ---------------------------------------------------------------------------------

    def _prepare(self, request: GenerateRequest):
        """The request's base, loaded if it is not the one in memory."""
        if self._pipe is not None and self._base == request.base:
            return self._pipe
        source = resolve_base(self.workspace, request.base)
        if is_pickle(source):  # load_pipeline's refusal would advise a flag the app lacks
            raise RequestError(
                f"base {request.base!r} is a pickled checkpoint, which can run code when loaded; "
                "the app opens .safetensors only. Convert it with a tool you trust"
            )
        # Free the old base first: two full models at once may not fit in memory.
        self._pipe = self._base = self._scheduler = self._applied = None
        self._adapters.clear()
        pipe = load_pipeline(source, dtype=self.dtype)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe.to(self.device)
        self._base, self._scheduler = request.base, pipe.scheduler
        return pipe

    def _entries(self, settings: tuple[AdapterUse[str], ...]) -> list[AdapterUse[AdapterState]]:
        """Read (or reuse) every adapter and check its family before any weight changes."""
        return [setting.loaded(self._load_adapter(setting.adapter).state) for setting in settings]

    def _load_adapter(self, name: str) -> _Loaded:
        path = self.workspace.resolve("adapters", name + ".safetensors")
        if not path.is_file():
            raise AdapterLoadError(
                f"adapter {name!r}: no file {path.name} in {self.workspace.adapters}"
            )
        if (problem := checkpoint_problem(self.workspace, path)) is not None:
            raise AdapterLoadError(f"adapter {name!r}: {problem}")
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_size, self._base)
        cached = self._adapters.get(path)
        if cached is not None and cached.key == key:
            return cached
        try:
            tensors, metadata = read_safetensors(path)
            family, base_family = detect_family(tensors, metadata), model_family(self._pipe)
            if family is not None and family != base_family:
                raise FamilyMismatchError(
                    f"adapter {name!r} was trained for {family} but the base {self._base!r} is "
                    f"{base_family}; choose a {base_family} adapter or a {family} base"
                )
            state = adapter_from_tensors(tensors, metadata, pipeline_module_paths(self._pipe),
                                         source=path)
        except AdapterFileError as e:
            raise AdapterLoadError(f"adapter {name!r}: {e}") from e
        hashed = short_hash(state) or file_hashes(path.read_bytes())["sshs_model_hash"][:12]
        loaded = _Loaded(key, state, hashed)
        self._adapters[path] = loaded
        while len(self._adapters) > ADAPTER_CACHE_SIZE:
            self._adapters.pop(next(iter(self._adapters)))
        return loaded

    def _merge(self, entries: list[AdapterUse[AdapterState]]) -> None:
        """Swap the merged adapters for `entries` (checked first; the base is never re-read)."""
        self._applied = apply_adapters(self._pipe, entries, replace=self._applied)

    def _seed(self, request: GenerateRequest) -> int:
        return request.seed if request.seed != -1 else random.SystemRandom().randrange(MAX_SEED)

    def _settings(self, request: GenerateRequest, seed: int) -> RenderSettings:
        self._pipe.scheduler = self._scheduler  # the sampler derives from the current config
        sampler = set_pipeline_sampler(self._pipe, request.sampler)
        size = native_resolution(self._pipe)
        return RenderSettings(
            prompt=request.prompt, seed=seed, negative_prompt=request.negative_prompt,
            steps=request.steps, guidance_scale=request.guidance,
            width=request.width or size, height=request.height or size, sampler=sampler,
        )

    def _parameters(self, request, settings: RenderSettings, entries) -> str:
        """The A1111 text: the prompt with its <lora:...> tags, and the adapters' hashes."""
        tags = " ".join(
            format_lora_tag(e.name, e.text_encoder, e.unet,
                            None if e.blocks is None else format_block_weights(e.blocks))
            for e in entries
        )
        extra = {"Model": request.base}
        if entries:
            hashes = ", ".join(f"{e.name}: {self._load_adapter(e.name).short_hash}" for e in entries)
            extra["Lora hashes"] = f'"{hashes}"'
        recorded = RenderSettings(**{**settings.__dict__, "extra": extra,
                                     "prompt": f"{settings.prompt} {tags}".strip()})
        return a1111_parameters(recorded)

    def _next_output_path(self, seed: int) -> Path:
        """outputs/<date>/<NNNNN>-<seed>.png, numbered on from the folder's highest (A1111's way)."""
        folder = self.workspace.outputs / date.today().isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        numbers = [int(m[1]) for p in folder.iterdir() if (m := re.match(r"(\d{5,})-", p.name))]
        return folder / f"{max(numbers, default=0) + 1:05d}-{seed}.png"


def _weights(entry: AdapterUse) -> str:
    if entry.unet == entry.text_encoder:
        return f"{entry.unet:g}"
    return f"te {entry.text_encoder:g}, unet {entry.unet:g}"


def _with_adapter(request: GenerateRequest, adapter: str):
    """weight -> the request's adapter settings with `adapter` at that strength (added if absent)."""
    existing = next((a for a in request.adapters if a.name == adapter), None)
    blocks = existing.blocks if existing is not None else None

    def settings(weight: float) -> tuple[AdapterUse[str], ...]:
        chosen = adapter_setting(adapter, weight, weight, blocks)
        others = tuple(a for a in request.adapters if a.name != adapter)
        return others + (chosen,) if existing is None else tuple(
            chosen if a.name == adapter else a for a in request.adapters
        )

    return settings
