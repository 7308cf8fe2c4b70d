"""Captions to the denoiser's conditioning, for one text encoder (SD 1.x/2.x), two (SDXL) or
three (SD3).

SD 1.x/2.x cross-attend to the last hidden state of their one CLIP encoder. SDXL, as its
pipeline does, concatenates the penultimate hidden states of both encoders (768 + 1280 wide)
and adds the second encoder's pooled, projected output and six size numbers (`time_ids`:
original height and width, crop top and left, target height and width) through
`added_cond_kwargs`. SD3, as its pipeline does: the two CLIPs' penultimate states side by side
(768 + 1280), zero-padded to T5's width (4096), then T5's last hidden state appended along the
sequence (77 + 256 tokens); both CLIPs' projected pooled outputs side by side (2048). Without
T5 (SD3 runs without it) its part is zeros, as in diffusers' pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# T5 tokens SD3 reads: diffusers' StableDiffusion3Pipeline's default max_sequence_length.
SD3_T5_TOKENS = 256


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on, for a batch of B prompts."""

    hidden_states: torch.Tensor  # (B, 77, D); SD3: (B, 77 + 256, T5 width)
    pooled: torch.Tensor | None = None  # (B, P): SDXL's second encoder, projected; SD3's two
    time_ids: torch.Tensor | None = None  # (B, 6): SDXL's size conditioning
    denoiser: str = field(default="unet", compare=False)  # "transformer": SD3's MMDiT

    def unet_kwargs(self) -> dict:
        if self.denoiser == "transformer":
            return {"encoder_hidden_states": self.hidden_states,
                    "pooled_projections": self.pooled}
        kwargs: dict = {"encoder_hidden_states": self.hidden_states}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def select(self, index) -> Conditioning:
        """The rows `index` (a slice, or a bool or index tensor) of every part."""
        return Conditioning(*(None if t is None else t[index] for t in self._parts()),
                            denoiser=self.denoiser)

    def to(self, device=None, dtype=None) -> Conditioning:
        return Conditioning(*(None if t is None else t.to(device=device, dtype=dtype)
                              for t in self._parts()), denoiser=self.denoiser)

    def _parts(self):
        return self.hidden_states, self.pooled, self.time_ids


def unet_forward(unet, noisy: torch.Tensor, timesteps: torch.Tensor,
                 conditioning: torch.Tensor | Conditioning) -> torch.Tensor:
    """The denoiser's prediction; a bare tensor is SD 1.x/2.x cross-attention states. SD3's
    transformer takes the timestep as a float (sigma x 1000) and its inputs by keyword."""
    if not isinstance(conditioning, Conditioning):
        return unet(noisy, timesteps, conditioning).sample
    if conditioning.denoiser == "transformer":
        return unet(hidden_states=noisy, timestep=timesteps, **conditioning.unet_kwargs()).sample
    return unet(noisy, timesteps, **conditioning.unet_kwargs()).sample


class NoT5(torch.nn.Module):
    """SD3's T5 when it is not loaded: zeros in its place (`width` wide, SD3_T5_TOKENS long),
    as diffusers' pipeline does. Prompts then reach the transformer through the CLIPs alone:
    shorter effective prompts (77 tokens) and weaker text rendering and prompt following,
    for 4.7B parameters (9.5 GB in bf16) less to hold."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, input_ids: torch.Tensor, **_) -> tuple[torch.Tensor]:
        return (torch.zeros(input_ids.shape[0], SD3_T5_TOKENS, self.width),)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, L) token ids, padded and truncated to the encoder's window (CLIP: 77; T5:
    SD3_T5_TOKENS)."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=token_window(tokenizer),
        truncation=True,
        return_tensors="pt",
    ).input_ids


def token_window(tokenizer) -> int:
    if is_t5_tokenizer(tokenizer):
        return SD3_T5_TOKENS
    return tokenizer.model_max_length


def is_t5_tokenizer(tokenizer) -> bool:
    return tokenizer is not None and "T5" in type(tokenizer).__name__


def tokenize_all(tokenizers: Sequence, captions: list[str]) -> torch.Tensor:
    """(B, E, L) token ids, one row per tokenizer (E = 1, 2 for SDXL, whose second tokenizer
    pads with "!" like OpenCLIP, or 3 for SD3). Rows shorter than the longest (SD3's 77-token
    CLIP rows beside T5's 256) are padded with each tokenizer's pad id; encoding reads each
    row up to its own encoder's window. A missing tokenizer (SD3 without T5) gives pad ids."""
    rows = [tokenize(t, captions) if t is not None
            else torch.zeros(len(captions), SD3_T5_TOKENS, dtype=torch.long) for t in tokenizers]
    length = max(r.shape[1] for r in rows)
    rows = [F.pad(r, (0, length - r.shape[1]), value=getattr(t, "pad_token_id", 0) or 0)
            for r, t in zip(rows, tokenizers)]
    return torch.stack(rows, dim=1)


def encode_prompts(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, 77, D) hidden states the UNet cross-attends to (one encoder, SD 1.x/2.x)."""
    return text_encoder(input_ids)[0]


def encode_all(text_encoders: Sequence[torch.nn.Module], input_ids: torch.Tensor,
               time_ids: torch.Tensor | None = None) -> Conditioning:
    """`input_ids` (B, E, L) from `tokenize_all` -> the denoiser's conditioning. With two
    encoders (SDXL) `time_ids` (B, 6) is required; three are SD3's (CLIP-L, CLIP-G, T5)."""
    if input_ids.dim() == 2:
        input_ids = input_ids[:, None]
    if len(text_encoders) != input_ids.shape[1]:
        raise ValueError(f"{len(text_encoders)} text encoders for {input_ids.shape[1]} token rows")
    if len(text_encoders) == 3:
        return encode_sd3(text_encoders, input_ids)
    input_ids = input_ids[..., :clip_window(text_encoders[0])]
    if len(text_encoders) == 1:
        return Conditioning(encode_prompts(text_encoders[0], input_ids[:, 0]))
    if time_ids is None:
        raise ValueError("SDXL conditioning needs time_ids (B, 6)")
    states, pooled = encode_clips(text_encoders, input_ids)  # SDXL pools the second's only
    return Conditioning(states, pooled[-1].to(states.dtype),
                        time_ids.to(states.device, states.dtype))


def clip_window(encoder: torch.nn.Module) -> int:
    """The tokens a CLIP encoder reads (77). A trained encoder may come wrapped for several
    processes (DistributedDataParallel), its config on the model inside."""
    config = getattr(encoder, "module", encoder).config
    return int(getattr(config, "max_position_embeddings", 77))


def encode_clips(encoders, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SDXL's and SD3's use of CLIP: the penultimate hidden states side by side (B, 77, sum of
    widths), and each encoder's projected pooled output (B, P_i)."""
    hidden, pooled = [], []
    for i, encoder in enumerate(encoders):
        out = encoder(input_ids[:, i, :clip_window(encoder)], output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # both condition on the penultimate layer
        pooled.append(out[0])
    return torch.cat(hidden, dim=-1), pooled


def encode_sd3(text_encoders, input_ids: torch.Tensor) -> Conditioning:
    """SD3's conditioning (see the module's docstring): (B, 77 + 256, T5 width) and (B, 2048)."""
    clip_states, pooled = encode_clips(text_encoders[:2], input_ids)
    t5_states = text_encoders[2](input_ids[:, 2, :SD3_T5_TOKENS])[0]
    clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    t5_states = t5_states.to(clip_states.device, clip_states.dtype)
    states = torch.cat([clip_states, t5_states], dim=-2)
    return Conditioning(states, torch.cat(pooled, dim=-1).to(states.dtype), denoiser="transformer")


def tokenizers_of(pipe) -> list:
    """The pipe's tokenizers in order; SD3's third (T5's) is None when T5 is not loaded."""
    if getattr(pipe, "transformer", None) is not None:
        t5 = pipe.tokenizer_3 if getattr(pipe, "text_encoder_3", None) is not None else None
        return [pipe.tokenizer, pipe.tokenizer_2, t5]
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


def text_encoders_of(pipe, overrides: dict[str, torch.nn.Module] | None = None) -> list:
    """The pipe's text encoders in order; `overrides` replaces some by name (e.g. the
    Accelerate-prepared ones that train). SD3's T5 is a `NoT5` when not loaded."""
    overrides = overrides or {}
    names = ["text_encoder"] + (["text_encoder_2"] if getattr(pipe, "text_encoder_2", None) is not None else [])
    encoders = [overrides.get(name, getattr(pipe, name)) for name in names]
    if getattr(pipe, "transformer", None) is not None:
        t5 = getattr(pipe, "text_encoder_3", None)
        encoders.append(t5 if t5 is not None else NoT5(pipe.transformer.config.joint_attention_dim))
    return encoders


def default_time_ids(batch: int, height: int, width: int) -> torch.Tensor:
    """(B, 6) size conditioning of an uncropped image generated at (height, width): what the
    SDXL pipeline uses by default."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)


class EmbeddingCache:
    """Frozen text encoders' outputs per caption: each distinct caption is encoded once, when
    first seen (so caption dropout and tag shuffling keep working; a shuffled caption is a new
    caption), then reused. Oldest entries go past `max_bytes`."""

    def __init__(self, max_bytes: int = 2 * 2**30) -> None:
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.max_bytes, self.bytes = max_bytes, 0
        self.hits = self.misses = 0
        self.denoiser = "unet"  # what the encoded conditioning is for (SD3: "transformer")

    @torch.no_grad()
    def conditioning(self, tokenizers, text_encoders, captions: list[str], time_ids,
                     device) -> Conditioning:
        found = {c: self.entries[c] for c in dict.fromkeys(captions) if c in self.entries}
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        if missing:
            ids = tokenize_all(tokenizers, missing).to(device)
            filler = default_time_ids(len(missing), 64, 64) if len(text_encoders) == 2 else None
            fresh = encode_all(text_encoders, ids, filler)
            self.denoiser = fresh.denoiser
            for j, caption in enumerate(missing):
                pooled = None if fresh.pooled is None else fresh.pooled[j]
                found[caption] = (fresh.hidden_states[j], pooled)
                self._add(caption, *found[caption])
        rows = [found[c] for c in captions]
        hidden = torch.stack([h for h, _ in rows])
        pooled = None if rows[0][1] is None else torch.stack([p for _, p in rows])
        if pooled is None or self.denoiser == "transformer":  # SD 1.x/2.x; SD3: no sizes
            return Conditioning(hidden, pooled, denoiser=self.denoiser)
        return Conditioning(hidden, pooled, time_ids.to(hidden.device, hidden.dtype))

    def _add(self, caption: str, hidden: torch.Tensor, pooled: torch.Tensor | None) -> None:
        size = _nbytes(hidden) + _nbytes(pooled)
        while self.entries and self.bytes + size > self.max_bytes:
            _, (old_h, old_p) = self._pop_oldest()
            self.bytes -= _nbytes(old_h) + _nbytes(old_p)
        self.entries[caption] = (hidden.clone(), None if pooled is None else pooled.clone())
        self.bytes += size

    def _pop_oldest(self):
        oldest = next(iter(self.entries))
        return oldest, self.entries.pop(oldest)


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()
