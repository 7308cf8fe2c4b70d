"""The walkthrough notebook runs from top to bottom without an error, in this venv's Python.

It is executed from a copy in a temporary folder laid out like the repository (`notebooks/`
beside `datasets/`), so its relative paths work and its `runs/` land in the temporary folder.
The kernel is a kernelspec written for this test with `sys.executable`: the `python3` spec that
Jupyter finds first may belong to another Python, without sd_lora installed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import install
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "sd-lora-test"
TIMEOUT_S = 600  # per cell; the whole notebook takes a few minutes on 2 CPU cores


def kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel manager that starts this interpreter's ipykernel, from a spec in `tmp_path`."""
    prefix = tmp_path / "jupyter"
    install(kernel_name=KERNEL_NAME, prefix=str(prefix))
    specs = KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])
    assert specs.get_kernel_spec(KERNEL_NAME).argv[0] == sys.executable
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"cell {i} has outputs"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKSTART_STEPS", "30")  # every cell still runs; the figures matter less
    work = tmp_path / "repo"
    shutil.copytree(REPO / "datasets" / "toy", work / "datasets" / "toy")
    shutil.copytree(REPO / "examples", work / "examples")
    (work / "notebooks").mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    km = kernel_manager(tmp_path)
    client = NotebookClient(
        nb,
        km=km,
        timeout=TIMEOUT_S,
        resources={"metadata": {"path": str(work / "notebooks")}},  # the kernel's cwd
    )
    try:
        client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    finally:  # a kernel manager passed in is ours to stop: the kernel outlived the test before
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    nbformat.write(nb, work / "notebooks" / "quickstart.ipynb")  # executed copy, for debugging

    assert nb.cells[-1].outputs[0]["text"].strip() == sys.prefix, "kernel ran another Python"
    assert (work / "runs" / "notebook" / "pastel" / "pastel.safetensors").is_file()
    assert (work / "runs" / "notebook" / "pastel" / "report.png").is_file()
    assert (work / "runs" / "notebook" / "golden" / "golden.safetensors").is_file()
    assert not (REPO / "notebooks" / "runs").exists()
