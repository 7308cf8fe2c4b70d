"""Helpers the tabs share: turning library errors into page messages, and adapter labels.

Nothing here decides anything about models or files; it formats what `sd_lora` reports.
"""

from __future__ import annotations

import functools
import logging
import math

import gradio as gr

from sd_lora.errors import UserError
from sd_lora.generate.png_info import parse_lora_tag
from sd_lora.services.workspace import AdapterInfo, Workspace, chosen_adapter_info, list_adapters

log = logging.getLogger("sd_lora.app")

NUM_SLOTS = 4  # adapter slots on the Generate tab: name, UNet strength, text-encoder strength
NO_ADAPTER = ""
BUILTIN_FAMILIES = {"toy": "sd1", "tiny": "sd1"}  # bases whose family is known without loading them
# Library errors that describe bad input (a file, a field, a value): shown as they are.
READABLE_ERRORS = (UserError, ValueError, OSError)


def friendly(fn):
    """Run a handler; input errors become a readable `gr.Error`, anything else is logged and
    shown as an internal error. The app keeps serving either way."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except READABLE_ERRORS as exc:
            raise gr.Error(str(exc), print_exception=False) from exc
        except Exception as exc:
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(
                f"internal error ({type(exc).__name__}: {exc}); the app's log has the traceback",
                print_exception=False,
            ) from exc

    return wrapper


def whole(value, field: str) -> int:
    """A number from a form field as an int; a fraction or a blank is an error naming it."""
    if value is None or value == "":
        raise UserError(f"{field} is empty; enter a whole number")
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        raise UserError(f"{field} = {value!r} must be a whole number")
    return int(number)


def number(value, field: str) -> float:
    if value is None or value == "":
        raise UserError(f"{field} is empty; enter a number")
    return float(value)


def adapter_choices(workspace: Workspace) -> list[tuple[str, str]]:
    """(label, name) pairs for the adapter dropdowns; unusable files are marked."""
    choices = [("(none)", NO_ADAPTER)]
    for info in list_adapters(workspace):
        label = info.name if info.problem is None else f"{info.name} (unreadable)"
        choices.append((label, info.name))
    return choices


def lora_tag_parts(text: str | None) -> tuple[str, float, float, str | None] | None:
    """A1111's `<lora:NAME:W>` / `<lora:NAME:TE:UNET>` typed where an adapter is chosen ->
    (NAME, te, unet, lbw text or None); None for a plain adapter name."""
    tag = (text or "").strip()
    if not (tag.startswith("<lora:") and tag.endswith(">")):
        return None
    return parse_lora_tag(tag[len("<lora:"):-1], f"adapter {tag}")


def adapter_name(text: str | None) -> str:
    """The adapter a name field chooses: a plain name (relative to the adapters folder, without
    .safetensors), or the name in an A1111 tag."""
    parts = lora_tag_parts(text)
    return parts[0] if parts is not None else (text or "")


def find_adapter(workspace: Workspace, name: str) -> AdapterInfo | None:
    name = adapter_name(name)
    if not name:
        return None
    path = workspace.resolve("adapters", name + ".safetensors")
    if not path.is_file():
        raise UserError(f"adapter {name!r}: no file {path.name} in {workspace.adapters}")
    return chosen_adapter_info(workspace, path)  # its values checked too: it was chosen


def describe_adapter(info: AdapterInfo | None) -> str:
    """One Markdown line: name, base family, rank, trigger words; or the file's problem."""
    if info is None:
        return ""
    if info.problem:
        return f"⚠ **{info.name}**: {info.problem}"
    rank = f"rank {info.rank}" if info.rank is not None else "rank ?"
    alpha = f", alpha {info.alpha:g}" if info.alpha is not None else ""
    words = ", ".join(f"`{w}`" for w in info.trigger_words) or "none recorded"
    return (
        f"**{info.name}** · base **{info.family or '?'}** · {rank}{alpha} · "
        f"{info.format or '?'} format  \ntrigger words: {words}"
    )


def family_warning(base: str, base_family: str | None, infos: list[AdapterInfo]) -> str:
    """Markdown flagging adapters that cannot work with the chosen base, before generating."""
    problems = [f"⚠ **{i.name}** cannot be used: {i.problem}" for i in infos if i.problem]
    family = base_family or BUILTIN_FAMILIES.get(base)
    usable = [i for i in infos if not i.problem and i.family]
    if family is not None:
        problems += [
            f"⚠ **{i.name}** was made for an **{i.family}** base, but **{base}** is "
            f"**{family}**: it will be refused; pick a {family} adapter or a {i.family} base"
            for i in usable
            if i.family != family
        ]
    elif len({i.family for i in usable}) > 1:
        families = ", ".join(f"{i.name}: {i.family}" for i in usable)
        problems.append(f"⚠ the adapters are for different base families ({families})")
    return "\n\n".join(problems)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
