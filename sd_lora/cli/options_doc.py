"""The table of every config option, made from `sd_lora.config` itself, so it cannot go stale.

    python -m sd_lora.cli.options_doc docs/configuration.md    # rewrite the table in place
    python -m sd_lora.cli.options_doc                          # print the table

Each row: the dotted name, its type (or accepted values), its default, and the comment written
beside or above the field in config.py. docs/configuration.md holds the table between two
markers; `tests/test_config.py` checks that it is what this makes.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

from sd_lora import config as config_module

BEGIN = ("<!-- options: made by `python -m sd_lora.cli.options_doc docs/configuration.md`; "
         "edit sd_lora/config.py -->")
END = "<!-- end of options -->"


def field_comments(cls) -> dict[str, str]:
    """{field: its comment}: the comment lines just above the field, then a trailing one."""
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").rstrip())
            continue
        match = re.match(r"(\w+)\s*:\s*[^=]+=\s*(.*)$", stripped)
        if match is None:
            above = []
            continue
        trailing = match.group(2).split("  # ", 1)
        text = " ".join(above + ([trailing[1].strip()] if len(trailing) > 1 else []))
        comments[match.group(1)] = text
        above = []
    return comments


def type_text(hint) -> str:
    if get_origin(hint) is typing.Literal:
        return " / ".join(f"`{v}`" for v in get_args(hint))
    if get_origin(hint) is tuple:
        return f"list of {type_text(get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def default_text(field) -> str:
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value!r}`".replace("'", '"')


def table() -> str:
    lines = []
    top = get_type_hints(config_module.JobConfig)
    for section in dataclasses.fields(config_module.JobConfig):
        cls = top[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        lines += [f"\n**[{section.name}]**\n", "| option | type | default | what it does |",
                  "|---|---|---|---|"]
        hints, comments = get_type_hints(cls), field_comments(cls)
        for field in dataclasses.fields(cls):
            text = comments.get(field.name, "").replace("|", "/")
            lines.append(f"| `{section.name}.{field.name}` | {type_text(hints[field.name])} | "
                         f"{default_text(field)} | {text} |")
    return "\n".join(lines) + "\n"


def with_table(text: str) -> str:
    """`text` with the part between BEGIN and END replaced by the current table."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the markers {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}{END}{tail}"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
        path.write_text(with_table(path.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(table(), end="")
