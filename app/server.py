"""Start the app: `launch(workspace, ...)` binds 127.0.0.1 unless a host or --share is asked for.

Gradio is imported only once the workspace's folders are set as its temporary folders: Gradio
and torch choose theirs when they are imported (see `keep_files_inside`).
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

from sd_lora.errors import UserError
from sd_lora.workspace import Workspace

if TYPE_CHECKING:
    import gradio as gr

LOCALHOST = "127.0.0.1"
QUEUE_MAX_SIZE = 128  # requests waiting, across the app's queued events


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'user:pass' -> ("user", "pass"); the password may contain ':'."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError(f"--auth {text!r}: give USER:PASSWORD, both non-empty")
    return user, password


def job_threads() -> dict[str, str]:
    """Training jobs get half the CPU cores, so the page (and generating) stays responsive; on
    2 cores torch's default threads in both processes made a 3-step tiny job 10x slower.
    An OMP_NUM_THREADS the user set is kept."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}


def keep_files_inside(workspace: Workspace) -> None:
    """Point this process's (and its jobs') temporary and cache files at the runs folder, so
    that the app writes only inside the folders it was given: Gradio's cache of uploads and
    served files (runs/.gradio); everything that asks `tempfile` (runs/.tmp: torch's compile
    cache, made when diffusers is imported; single-file bases' config folders); matplotlib's
    config and font cache (Gradio imports it for every request; else in ~/.config, ~/.cache).
    Gradio and torch read these when they are imported, so this runs first: set after `import
    gradio`, Gradio kept the system temp folder for a folder it makes at every launch."""
    tmp = workspace.runs / ".tmp"
    tmp.mkdir(exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(workspace.runs / ".gradio")
    os.environ["TMPDIR"] = str(tmp)  # the job processes inherit these
    os.environ["MPLCONFIGDIR"] = str(tmp / "matplotlib")
    tempfile.tempdir = str(tmp)  # this process may have asked tempfile already
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def create_app(workspace: Workspace, device: str = "cpu") -> gr.Blocks:
    """The Blocks app with its queue: one model operation at a time, status polls alongside."""
    keep_files_inside(workspace)
    from app.ui import build_ui
    from sd_lora.jobs import JobManager
    from sd_lora.session import GenerationSession

    jobs = JobManager(workspace, extra_env=job_threads())
    demo = build_ui(workspace, GenerationSession(workspace, device=device), jobs)
    # One model, one request at a time (concurrency 1 per event); a bounded queue, so a flood
    # of requests is told "the queue is full" instead of piling up memory.
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return demo


def launch(workspace: Workspace, *, host: str | None = None, port: int | None = None,
           share: bool = False, auth: tuple[str, str] | None = None, block: bool = True,
           device: str = "cpu", quiet: bool = False) -> tuple[gr.Blocks, str]:
    """Serve the app; returns (demo, local url). With block=False it runs in a thread
    (call demo.close() to stop it)."""
    demo = create_app(workspace, device)  # first: it sets the temporary folders, then imports gradio
    from app.ui import CSS

    folders = [workspace.adapters, workspace.outputs, workspace.runs]
    _, url, _ = demo.launch(
        server_name=host or LOCALHOST, server_port=port, share=share, auth=auth,
        prevent_thread_lock=not block, show_error=True, quiet=quiet, css=CSS,
        allowed_paths=[str(f) for f in folders], ssr_mode=False, footer_links=["api"],
    )
    return demo, url
