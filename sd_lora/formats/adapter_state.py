"""The in-memory form of an adapter, independent of any file format.

Every reader produces an `AdapterState` and every writer consumes one, so format conversions are
pure functions between a file's tensors and this structure (see `sd_lora.formats`).

Names use PEFT's vocabulary: `lora_A` is the down projection (r, in), `lora_B` the up projection
(out, r). Module paths are the diffusers/transformers module names of the component, with the
canonical `text_model.` level kept for CLIP text encoders (transformers 5 drops it from its own
module names; every community LoRA file has it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sd_lora.util.words import plural

# The pipeline attribute each component lives under; the same strings key `AdapterState.modules`.
# SD 1.x/2.x/SDXL denoise with a UNet, SD3 with an MMDiT transformer and three text encoders
# (LoRA on the two CLIPs; T5, text_encoder_3, stays frozen).
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
DENOISERS = ("unet", "transformer")
FAMILIES = ("sd1", "sd2", "sdxl", "sd3")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD 3.x"}
# The text features each family's cross-attention reads: what a file's to_k input width tells.
CONTEXT_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}

# transformers 5 drops this level from CLIP module names; every community LoRA file keeps it.
TEXT_MODEL_LEVEL = "text_model."


def canonical_name(component: str, module_name: str) -> str:
    """Module path as community files spell it: CLIP names keep their `text_model.` level."""
    if component.startswith("text_encoder") and not module_name.startswith(TEXT_MODEL_LEVEL):
        return TEXT_MODEL_LEVEL + module_name
    return module_name


@dataclass
class LoraModule:
    """One adapted layer: W' = W + strength * (alpha / r) * lora_B @ lora_A."""

    lora_A: torch.Tensor  # (r, in) for Linear, (r, in, kh, kw) for Conv2d
    lora_B: torch.Tensor  # (out, r) for Linear, (out, r, 1, 1) for Conv2d
    alpha: float
    kind = "lora"

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r: the one place this ratio is computed."""
        return float(self.alpha) / self.r

    def delta(self, strength: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight change this module applies, shaped like the base layer's weight."""
        down = self.lora_A.to(dtype)
        up = self.lora_B.to(dtype)
        if down.dim() == 2:
            product = up @ down  # (out, in)
        else:  # conv: (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
            product = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return product * (strength * self.scale)


@dataclass
class LohaModule:
    """LyCORIS LoHa (`hada_*` keys): W' = W + strength * (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b),
    a Hadamard (element-wise) product of two rank-r products. Conv kernels are stored
    flattened, (out, in*kh*kw): the delta is reshaped to the layer's weight when applied.

    With Tucker-decomposed kernels (LyCORIS' use_tucker, `hada_t1`/`hada_t2` (r, r, kh, kw)) each
    factor is t contracted with both matrices, which are then (r, out) and (r, in):
    rebuild[p, q, k, l] = sum_ij t[i, j, k, l] * w_b[j, q] * w_a[i, p]."""

    w1_a: torch.Tensor  # (out, r); Tucker: (r, out)
    w1_b: torch.Tensor  # (r, in*kh*kw); Tucker: (r, in)
    w2_a: torch.Tensor  # (out, r); Tucker: (r, out)
    w2_b: torch.Tensor  # (r, in*kh*kw); Tucker: (r, in)
    alpha: float
    t1: torch.Tensor | None = None  # (r, r, kh, kw)
    t2: torch.Tensor | None = None
    kind = "loha"

    @property
    def r(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.r

    def delta(self, strength: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        first = _factor(self.w1_a, self.w1_b, self.t1, dtype)
        second = _factor(self.w2_a, self.w2_b, self.t2, dtype)
        return first * second * (strength * self.scale)


def _factor(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, dtype) -> torch.Tensor:
    """a @ b, or with a Tucker core t: (out, in, kh, kw) = t x_0 a x_1 b (see LohaModule)."""
    if t is None:
        return a.to(dtype) @ b.to(dtype).flatten(1)
    return torch.einsum("ijkl,jq,ip->pqkl", t.to(dtype), b.to(dtype), a.to(dtype)).contiguous()


@dataclass
class LokrModule:
    """LyCORIS LoKr (`lokr_*` keys): W' = W + strength * scale * kron(w1, w2), where w1 and w2 are
    stored whole (`lokr_w1`) or as a product (`lokr_w1_a @ lokr_w1_b`). scale = alpha / dim,
    dim the inner size of the (last) factored one; 1 when neither is factored (LyCORIS' and
    ComfyUI's rule). A 4-D w2 is a conv kernel (out2, in2, kh, kw); with a Tucker core
    `lokr_t2` (r, r, kh, kw) the factored w2 is built from it as LoHa's factors are."""

    w1: torch.Tensor | None
    w2: torch.Tensor | None
    alpha: float | None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind = "lokr"

    @property
    def dim(self) -> int | None:
        if self.w2_b is not None:
            return int(self.w2_b.shape[0])
        return int(self.w1_b.shape[0]) if self.w1_b is not None else None

    @property
    def r(self) -> int:
        """For display (ss_network_dim): the factor rank, else the smaller whole factor's."""
        if self.dim is not None:
            return self.dim
        return int(min(self.w1.shape[0], self.w1.shape[1]))

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None or self.dim is None else float(self.alpha) / self.dim

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.w1.to(dtype) if self.w1 is not None else self.w1_a.to(dtype) @ self.w1_b.to(dtype)
        w2 = self.w2.to(dtype) if self.w2 is not None else _factor(self.w2_a, self.w2_b, self.t2, dtype)
        return w1, w2

    def delta(self, strength: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w1, w2 = self.factors(dtype)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2) * (strength * self.scale)


class NeedsBaseWeight(ValueError):
    """A module (DoRA) whose weight change depends on the base layer's weight."""


DORA_EPS = 1e-6  # added to the norms DoRA divides by, as LyCORIS does
COMFYUI_EPS = float(torch.finfo(torch.float32).eps)  # ComfyUI's, in its float32 patching
# Metadata of a kohya file whose row magnitudes are for ComfyUI's formula (DoraModule.norm_of)
DORA_NORM_KEY = "sd_lora_dora_norm"


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each output row (out, 1, ...) of a Linear or conv weight."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(
        weight.shape[0], *[1] * (weight.dim() - 1))


@dataclass
class DoraModule:
    """DoRA (`dora_scale` beside a LoRA, LoHa or LoKr module's tensors, as LyCORIS and
    sd-scripts write it): the updated weight V = W + delta is renormalised to the learned
    magnitudes, W_dora = dora_scale * V / ||V||. `dora_scale` of shape (1, in, ...) holds one
    magnitude per input column (the norm is over each column of V: LyCORIS' default), of
    shape (out, 1, ...) one per output row. At strength s the layer is W + s * (W_dora - W),
    as ComfyUI applies it. The change depends on W, so `delta()` needs it: `delta_on(W)`."""

    inner: LoraModule | LohaModule | LokrModule
    dora_scale: torch.Tensor
    # "updated": the norms above, of V (DoRA itself; LyCORIS, PEFT). "base": per-row magnitudes
    # divided by the base weight's row norms instead, m * V / (||W|| + eps), which is what
    # ComfyUI computes for an (out, 1) dora_scale; a file written for ComfyUI holds
    # m_trained * (||W|| + eps) / ||V|| so that ComfyUI gets the trained weight (DORA_NORM_KEY).
    norm_of: str = "updated"
    kind = "dora"

    @property
    def r(self) -> int:
        return self.inner.r

    @property
    def alpha(self) -> float | None:
        return self.inner.alpha

    @property
    def scale(self) -> float:
        return self.inner.scale

    def on_output_axis(self, weight_shape: tuple[int, ...]) -> bool:
        """One magnitude per output row (out, 1, ...) rather than per input column (1, in, ...)."""
        shape = tuple(self.dora_scale.shape)
        return shape[0] == weight_shape[0] != 1 and all(d == 1 for d in shape[1:])

    def delta(self, strength: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NeedsBaseWeight(
            "a DoRA module's change depends on the base layer's weight: apply it to a base "
            "(generate, the app, merge --into); merge, resize and the diffusers layout cannot "
            "hold it as a base-independent delta"
        )

    def delta_on(self, weight: torch.Tensor, strength: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_dora - W for base weight `weight`, times `strength`."""
        base = weight.to(dtype)
        updated = base + self.inner.delta(1.0, dtype).reshape(base.shape)
        if self.on_output_axis(tuple(base.shape)):
            rows = base if self.norm_of == "base" else updated
            norm = row_norms(rows) + (COMFYUI_EPS if self.norm_of == "base" else DORA_EPS)
        else:
            norm = updated.transpose(0, 1).reshape(base.shape[1], -1).norm(dim=1)
            norm = norm.reshape(1, base.shape[1], *[1] * (base.dim() - 2)) + DORA_EPS
        magnitude = self.dora_scale.to(dtype).reshape(norm.shape)
        return (updated * (magnitude / norm) - base) * strength

    def delta_shape(self) -> torch.Size:
        return self.inner.delta().shape


ADAPTER_MODULES = (LoraModule, LohaModule, LokrModule, DoraModule)


def applied_delta(module, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """The change `module` makes to a layer of base weight `weight` at `strength`, shaped
    like `weight` (LyCORIS' flattened conv deltas reshaped)."""
    if module.kind == "dora":
        return module.delta_on(weight, strength).to(weight.dtype)
    return module.delta(strength).to(weight.device).reshape(weight.shape)


def delta_shape(module) -> torch.Size:
    return module.delta_shape() if module.kind == "dora" else module.delta().shape


def fits(module, weight_shape: tuple[int, ...]) -> bool:
    """Whether `module`'s delta can be added to a weight of `weight_shape`: the same shape, or
    (LyCORIS' flattened conv kernels) the same output size and number of elements."""
    shape = tuple(delta_shape(module))
    if shape == tuple(weight_shape):
        return True
    return shape[0] == weight_shape[0] and math.prod(shape) == math.prod(weight_shape)


@dataclass
class AdapterState:
    """All LoRA modules of one adapter, keyed by component then module path."""

    family: str  # one of FAMILIES
    modules: dict[str, dict[str, LoraModule]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # Modules of the file that match nothing in the target model: {name in the file: why}.
    unmatched: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown base family {self.family!r}; expected one of {FAMILIES}")
        unknown = set(self.modules) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; expected {COMPONENTS}")

    def kinds(self) -> set[str]:
        """"lora", "loha", "lokr", "dora": what the modules are."""
        return {m.kind for comp in self.modules.values() for m in comp.values()}

    def coverage(self) -> str:
        """'N modules matched' plus what was left out, for logs and reports."""
        text = f"{plural(self.count(), 'module')} matched"
        if self.unmatched:
            names = ", ".join(sorted(self.unmatched)[:3]) + (" ..." if len(self.unmatched) > 3 else "")
            text += f"; {len(self.unmatched)} in the file match nothing and are left out ({names})"
        return text

    def count(self) -> int:
        return sum(len(m) for m in self.modules.values())

    def ranks(self) -> set[int]:
        return {m.r for comp in self.modules.values() for m in comp.values()}

    def alphas(self) -> set[float]:
        return {float(m.r if m.alpha is None else m.alpha)  # a LoKr without alpha: scale 1
                for comp in self.modules.values() for m in comp.values()}


def for_comfyui(state: AdapterState, base_weights: dict[str, dict[str, torch.Tensor]]) -> AdapterState:
    """`state` with every per-row DoRA magnitude rescaled for ComfyUI's formula (see
    DoraModule.norm_of): m' = m * (||W|| + eps) / (||V|| + eps) with the base weights the
    adapter was trained on ({component: {module path: W}}), so that ComfyUI, dividing by ||W||,
    gets m * V / ||V||. Other modules are kept as they are."""
    modules: dict[str, dict] = {}
    for component, by_path in state.modules.items():
        modules[component] = {}
        for path, module in by_path.items():
            weight = base_weights.get(component, {}).get(path)
            if module.kind == "dora" and module.norm_of == "updated" and weight is not None \
                    and module.on_output_axis(tuple(weight.shape)):
                base = weight.float()
                updated = base + module.inner.delta(1.0).reshape(base.shape)
                ratio = (row_norms(base) + COMFYUI_EPS) / (row_norms(updated) + DORA_EPS)
                scale = module.dora_scale.float().reshape(ratio.shape) * ratio
                module = DoraModule(module.inner, scale.reshape(module.dora_scale.shape), "base")
            modules[component][path] = module
    return AdapterState(family=state.family, modules=modules, metadata=dict(state.metadata))
