"""Form values <-> library requests, without Gradio: what the Generate and Compare tabs send,
and what "send parameters back" puts into the form.

The Generate form is a fixed list of values (see `SETTINGS`), followed by NUM_SLOTS groups of
`SLOT_FIELDS`; every endpoint that renders takes exactly that list, in that order.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from sd_lora.errors import UserError
from sd_lora.generate.png_info import ParsedParameters
from sd_lora.services.session import GenerateRequest, adapter_setting

from .common import NO_ADAPTER, NUM_SLOTS, lora_tag_parts, number, whole

SETTINGS = ("base", "prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height",
            "sampler", "batch_count")  # fmt: skip
SLOT_FIELDS = ("name", "unet", "te", "blocks")
FORM_PARAMS = SETTINGS + tuple(f"adapter{i + 1}_{f}" for i in range(NUM_SLOTS) for f in SLOT_FIELDS)


def form_signature(*leading: str):
    """Give a `(self, *leading, *values)` handler named parameters (the form's fields), so the
    API page and gradio_client name every value instead of param_0, param_1, ..."""

    def decorate(fn):
        names = ("self", *leading, *FORM_PARAMS)
        fn.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
        )
        return fn

    return decorate


def build_request(*values) -> GenerateRequest:
    """The form's values (SETTINGS, then the slots' SLOT_FIELDS) -> a validated request."""
    expected = len(SETTINGS) + NUM_SLOTS * len(SLOT_FIELDS)
    if len(values) != expected:
        raise UserError(f"expected {expected} form values, got {len(values)}")
    form = dict(zip(SETTINGS, values))
    slots = values[len(SETTINGS):]
    adapters = []
    for i in range(NUM_SLOTS):
        name, unet, te, blocks = slots[i * 4:(i + 1) * 4]
        if name in (None, NO_ADAPTER):
            continue
        if (tag := lora_tag_parts(name)) is not None:  # A1111's <lora:NAME:TE:UNET>: its strengths
            name, te, unet, blocks = tag[0], tag[1], tag[2], tag[3] or blocks
        where = f"adapter slot {i + 1} ({name})"
        adapters.append(adapter_setting(
            name=str(name), unet=number(unet, f"{where}: UNet (SD3: transformer) strength"),
            te=number(te, f"{where}: text-encoder strength"),
            blocks=(blocks or "").strip() or None,
        ))
    return GenerateRequest(
        base=str(form["base"] or "").strip(), prompt=form["prompt"] or "",
        negative_prompt=form["negative_prompt"] or "", seed=whole(form["seed"], "seed"),
        steps=whole(form["steps"], "steps"), guidance=number(form["guidance"], "guidance"),
        width=whole(form["width"], "width"), height=whole(form["height"], "height"),
        sampler=str(form["sampler"] or ""), batch_count=whole(form["batch_count"], "batch count"),
        adapters=tuple(adapters),
    )


def parse_list(text: str, field: str, kind=float) -> list:
    """'0, 0.25, 0.5' -> [0.0, 0.25, 0.5]; an error names the bad item."""
    items = [t.strip() for t in (text or "").replace(";", ",").split(",") if t.strip()]
    if not items:
        raise UserError(f"{field} is empty; give comma-separated values such as 0, 0.5, 1")
    values = []
    for item in items:
        try:
            values.append(whole(item, field) if kind is int else float(item))
        except (ValueError, UserError):
            raise UserError(f"{field}: {item!r} is not a {'whole ' if kind is int else ''}number") from None
    return values


@dataclass(frozen=True)
class Restored:
    """What a past image's parameters put back into the form, and what could not be."""

    settings: list  # in SETTINGS order
    slots: list  # NUM_SLOTS * SLOT_FIELDS values
    notes: list[str]


def restore_form(parsed: ParsedParameters, known_adapters: set[str]) -> Restored:
    """The form values that reproduce `parsed` (A1111 parameters read from an image)."""
    notes = []
    loras = parsed.loras
    if len(loras) > NUM_SLOTS:
        dropped = ", ".join(name for name, _, _ in loras[NUM_SLOTS:])
        notes.append(f"only {NUM_SLOTS} adapter slots: left out {dropped}")
        loras = loras[:NUM_SLOTS]
    slots: list = []
    for name, te, unet in loras:
        if name not in known_adapters:
            notes.append(f"adapter {name!r} is not in the adapters folder")
        slots += [name, unet, te, parsed.lora_blocks.get(name, "")]
    for _ in range(NUM_SLOTS - len(loras)):
        slots += [NO_ADAPTER, 1.0, 1.0, ""]
    settings = [
        parsed.model or "toy", parsed.prompt, parsed.negative_prompt, parsed.seed, parsed.steps,
        parsed.guidance, parsed.width, parsed.height, parsed.sampler, 1,
    ]
    if parsed.model is None:
        notes.append("the image does not name its model; using the built-in toy base")
    return Restored(settings, slots, notes)
