"""keep_freed_memory: set where glibc is, a no-op where asked or elsewhere; the train command
and the app's job process call it."""

import platform
import subprocess
import sys

import pytest

from sd_lora.util import malloc


def test_it_sets_the_thresholds_on_glibc_and_not_when_opted_out(monkeypatch):
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    # In a child: mallopt changes the whole process (this one runs the other tests).
    code = "from sd_lora.util.malloc import keep_freed_memory as k; print(k())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"
    monkeypatch.setenv(malloc.OPT_OUT, "1")
    assert malloc.keep_freed_memory() is False


def test_elsewhere_it_does_nothing(monkeypatch):
    monkeypatch.setattr(malloc.platform, "system", lambda: "Darwin")
    assert malloc.keep_freed_memory() is False


def test_the_processes_that_train_and_exit_call_it():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in ("sd_lora/cli/main.py", "app/job_process.py"):
        assert "keep_freed_memory()" in (root / path).read_text(), path
