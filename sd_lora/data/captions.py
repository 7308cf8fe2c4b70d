"""The trigger word of a captioned dataset: the tag most captions start with."""

from __future__ import annotations

from collections import Counter

TRIGGER_SHARE = 0.8  # a first caption tag this common is the trigger word


def detect_trigger(captions: list[str]) -> str | None:
    """The first comma-separated tag, if at least TRIGGER_SHARE of the captions start with it."""
    firsts = Counter(c.split(",")[0].strip() for c in captions if c.strip())
    if not firsts:
        return None
    tag, n = firsts.most_common(1)[0]
    return tag if tag and n >= TRIGGER_SHARE * len(captions) else None


def strip_trigger(caption: str, trigger: str | None) -> str:
    """The caption without its leading trigger tag ("zkstripes, a red circle" -> "a red circle")."""
    if not trigger:
        return caption
    head, sep, rest = caption.partition(",")
    return rest.strip() if sep and head.strip() == trigger else caption
