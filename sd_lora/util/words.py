"""Counts in words, for every message that prints one: '1 image', '2 images'."""

from __future__ import annotations


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 image', '2 images'; `plural_form` for the irregular ('1 process', '2 processes')."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"
