"""Captions to the UNet's conditioning, for one text encoder (SD 1.x/2.x) or two (SDXL).

SD 1.x/2.x cross-attend to the last hidden state of their one CLIP encoder. SDXL, as its
pipeline does, concatenates the penultimate hidden states of both encoders (768 + 1280 wide)
and adds the second encoder's pooled, projected output and six size numbers (`time_ids`:
original height and width, crop top and left, target height and width) through
`added_cond_kwargs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on, for a batch of B prompts."""

    hidden_states: torch.Tensor  # (B, 77, D)
    pooled: torch.Tensor | None = None  # (B, P): SDXL's second encoder, projected
    time_ids: torch.Tensor | None = None  # (B, 6): SDXL's size conditioning

    def unet_kwargs(self) -> dict:
        kwargs: dict = {"encoder_hidden_states": self.hidden_states}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def select(self, index) -> Conditioning:
        """The rows `index` (a slice, or a bool or index tensor) of every part."""
        return Conditioning(*(None if t is None else t[index] for t in self._parts()))

    def to(self, device=None, dtype=None) -> Conditioning:
        return Conditioning(*(None if t is None else t.to(device=device, dtype=dtype)
                              for t in self._parts()))

    def _parts(self):
        return self.hidden_states, self.pooled, self.time_ids


def unet_forward(unet, noisy: torch.Tensor, timesteps: torch.Tensor,
                 conditioning: torch.Tensor | Conditioning) -> torch.Tensor:
    """The UNet's prediction; a bare tensor is SD 1.x/2.x cross-attention states."""
    if not isinstance(conditioning, Conditioning):
        return unet(noisy, timesteps, conditioning).sample
    return unet(noisy, timesteps, **conditioning.unet_kwargs()).sample


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, 77) token ids, padded and truncated to the encoder's window."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def tokenize_all(tokenizers: Sequence, captions: list[str]) -> torch.Tensor:
    """(B, E, 77) token ids, one row per tokenizer (E = 1, or 2 for SDXL, whose second
    tokenizer pads with "!" like OpenCLIP)."""
    return torch.stack([tokenize(t, captions) for t in tokenizers], dim=1)


def encode_prompts(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, 77, D) hidden states the UNet cross-attends to (one encoder, SD 1.x/2.x)."""
    return text_encoder(input_ids)[0]


def encode_all(text_encoders: Sequence[torch.nn.Module], input_ids: torch.Tensor,
               time_ids: torch.Tensor | None = None) -> Conditioning:
    """`input_ids` (B, E, 77) from `tokenize_all` -> the UNet's conditioning. With two
    encoders (SDXL) `time_ids` (B, 6) is required."""
    if input_ids.dim() == 2:
        input_ids = input_ids[:, None]
    if len(text_encoders) != input_ids.shape[1]:
        raise ValueError(f"{len(text_encoders)} text encoders for {input_ids.shape[1]} token rows")
    if len(text_encoders) == 1:
        return Conditioning(encode_prompts(text_encoders[0], input_ids[:, 0]))
    if time_ids is None:
        raise ValueError("SDXL conditioning needs time_ids (B, 6)")
    hidden, pooled = [], None
    for i, encoder in enumerate(text_encoders):
        out = encoder(input_ids[:, i], output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
        pooled = out[0]  # the last encoder's projected pooled output: (B, P)
    states = torch.cat(hidden, dim=-1)
    return Conditioning(states, pooled.to(states.dtype), time_ids.to(states.device, states.dtype))


def tokenizers_of(pipe) -> list:
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


def text_encoders_of(pipe, overrides: dict[str, torch.nn.Module] | None = None) -> list:
    """The pipe's text encoders in order; `overrides` replaces some by name (e.g. the
    Accelerate-prepared ones that train)."""
    overrides = overrides or {}
    names = ["text_encoder"] + (["text_encoder_2"] if getattr(pipe, "text_encoder_2", None) is not None else [])
    return [overrides.get(name, getattr(pipe, name)) for name in names]


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

    @torch.no_grad()
    def conditioning(self, tokenizers, text_encoders, captions: list[str], time_ids,
                     device) -> Conditioning:
        found = {c: self.entries[c] for c in dict.fromkeys(captions) if c in self.entries}
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        if missing:
            ids = tokenize_all(tokenizers, missing).to(device)
            filler = default_time_ids(len(missing), 64, 64) if len(text_encoders) > 1 else None
            fresh = encode_all(text_encoders, ids, filler)
            for j, caption in enumerate(missing):
                pooled = None if fresh.pooled is None else fresh.pooled[j]
                found[caption] = (fresh.hidden_states[j], pooled)
                self._add(caption, *found[caption])
        rows = [found[c] for c in captions]
        hidden = torch.stack([h for h, _ in rows])
        pooled = None if rows[0][1] is None else torch.stack([p for _, p in rows])
        if pooled is None:
            return Conditioning(hidden)
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
