"""Start the app: `launch(workspace, ...)` binds 127.0.0.1 unless a host or --share is asked for.

Gradio is imported only once the workspace's folders are set as its temporary folders: Gradio
and torch choose theirs when they are imported (see `keep_files_inside`).
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from typing import TYPE_CHECKING

from sd_lora.errors import UserError
from sd_lora.services.workspace import Workspace

if TYPE_CHECKING:
    import gradio as gr

LOCALHOST = "127.0.0.1"
QUEUE_MAX_SIZE = 128  # requests waiting, across the app's queued events
FIRST_PORT, PORTS_TRIED = 7860, 100  # without --port, Gradio takes the first free of these


def check_port(host: str | None, port: int | None) -> None:
    """An explicit --port that cannot be used, refused before anything starts and in the
    command's own words (Gradio's error names its launch() parameter and prints a traceback).
    Bound as Gradio checks it: with SO_REUSEADDR, so a port in TIME_WAIT counts as free."""
    if port is None:
        return
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} must be from 1 to 65535; or leave --port out "
                        f"({FIRST_PORT} or the next free one)")
    host = host or LOCALHOST
    if _port_error(host, port) == errno.EADDRINUSE:
        free = next((p for p in range(port + 1, min(port + PORTS_TRIED, 65536))
                     if _port_error(host, p) is None), None)
        other = f"choose another (--port {free} is free)" if free else "choose another"
        raise UserError(f"--port {port} is already in use on {host}; {other}, or leave --port "
                        f"out to take the first free one from {FIRST_PORT}")


def _port_error(host: str, port: int) -> int | None:
    """The errno binding host:port gives (None: free). Errors other than the port being taken
    (an address that is not this computer's) are left for the server to report."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            return e.errno
    return None


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


JOB_PROCESS = "sd_lora_app.job_process"  # adds the toy world's style scorer to each job


def create_app(workspace: Workspace, device: str = "cpu") -> gr.Blocks:
    """The Blocks app with its queue: one model operation at a time, status polls alongside."""
    keep_files_inside(workspace)
    from sd_lora.services.jobs import JobManager
    from sd_lora.services.session import GenerationSession

    from .ui import build_ui

    jobs = JobManager(workspace, extra_env=job_threads(), job_module=JOB_PROCESS)
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
    check_port(host, port)  # again: the CLI checked before making folders, a caller may not have
    demo = create_app(workspace, device)  # first: it sets the temporary folders, then imports gradio
    from .ui import CSS

    folders = [workspace.adapters, workspace.outputs, workspace.runs]
    try:  # quiet: Gradio's start-up advice names launch() arguments; ours names the flags
        _, url, _ = demo.launch(
            server_name=host or LOCALHOST, server_port=port, share=share, auth=auth,
            prevent_thread_lock=True, show_error=True, quiet=True, css=CSS,
            allowed_paths=[str(f) for f in folders], ssr_mode=False, footer_links=["api"],
        )
    except OSError as e:  # the port was taken between the check and the start, or none was free
        if "port" not in str(e):
            raise
        raise UserError(_start_failure(port, e)) from None
    if not quiet:
        print(start_lines(url, host, share))
    if block:
        demo.block_thread()
    return demo, url


def start_lines(url: str, host: str | None, share: bool) -> str:
    """What the command prints once the page is served (Gradio prints the public link itself)."""
    lines = [f"sd-lora app: {url}"]
    if not share and (host or LOCALHOST) in (LOCALHOST, "localhost"):
        lines.append("  this computer only; --share adds a public link, --host 0.0.0.0 serves "
                     "your network (with --auth USER:PASSWORD)")
    lines.append("  Ctrl-C stops it")
    return "\n".join(lines)


def _start_failure(port: int | None, error: OSError) -> str:
    if port is not None:
        return (f"--port {port} could not be used ({error.strerror or 'in use'}); choose another, "
                f"or leave --port out to take the first free one from {FIRST_PORT}")
    last = FIRST_PORT + PORTS_TRIED - 1
    return f"no free port from {FIRST_PORT} to {last}; choose one with --port"
