"""The sd-lora browser app (Gradio): Generate, Compare and Train tabs over `sd_lora`.

    sd-lora app --models DIR --adapters DIR        (or: python -m sd_lora_app ...)
"""

from __future__ import annotations


def __getattr__(name: str):
    # Gradio loads on first use, so `import app` stays cheap.
    if name in ("launch", "create_app", "parse_auth"):
        from . import server

        return getattr(server, name)
    if name == "build_ui":
        from .ui import build_ui

        return build_ui
    raise AttributeError(f"module 'app' has no attribute {name!r}")
