"""Captions to text-encoder conditioning (SD 1.x/2.x: one CLIP encoder, last hidden state)."""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, 77) token ids, padded and truncated to the encoder's window."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, 77, D) hidden states the UNet cross-attends to."""
    return text_encoder(input_ids)[0]
