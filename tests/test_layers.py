"""The import direction of docs/architecture.md, read from the code.

Every import in `sd_lora/` and `app/` counts, function-local ones included: a lazy import is still
a dependency, and hiding an upward one inside a function is how the flat layout's cycles grew.
A module may import from a lower layer or its own; nothing else.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A prefix names a module or a package (and everything under it).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("sd_lora.config", "sd_lora.choices", "sd_lora.errors", "sd_lora.util")),
    ("formats", ("sd_lora.formats",)),
    ("models", ("sd_lora.models",)),
    ("engines", ("sd_lora.objective", "sd_lora.data", "sd_lora.lora")),
    ("adapters", ("sd_lora.adapters",)),
    ("generate", ("sd_lora.generate",)),
    ("train", ("sd_lora.train",)),
    ("services", ("sd_lora.services",)),
    ("world", ("sd_lora.world",)),
    ("front-ends", ("sd_lora.cli", "sd_lora.__main__", "sd_lora")),
    ("app", ("app",)),  # plugs its `sd-lora app` command in through an entry point
]
# What "pure tables" means for formats/: none of these, ever.
FORMATS_NEVER = ("torch.nn", "peft", "diffusers", "transformers", "safetensors", "accelerate")


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, package) of a project module, or None for a module outside the project."""
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (rank, prefix)
    return best


def package_of(module: str) -> str:
    """The package a module shares freely with its siblings: sd_lora.train.loop -> sd_lora.train."""
    parts = module.split(".")
    if parts[0] == "app":
        return "app"
    return ".".join(parts[:2])


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the source, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when that is a module of the project
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if _is_project_module(candidate) else base))
    return found


def _is_project_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def project_files() -> list[Path]:
    return sorted(p for folder in ("sd_lora", "app") for p in (ROOT / folder).rglob("*.py"))


def violations(files: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import against the direction, as 'importer:line -> imported (why)'."""
    found = []
    for module, (source, is_package) in files.items():
        mine = layer_of(module)
        for line, target in imports_of(source, module, is_package):
            if module.startswith("sd_lora.formats") and any(
                    target == n or target.startswith(n + ".") for n in FORMATS_NEVER):
                found.append(f"{module}:{line} -> {target} (formats are pure tables)")
                continue
            theirs = layer_of(target)
            if theirs is None or mine is None or package_of(target) == package_of(module):
                continue
            if theirs[0] > mine[0]:
                found.append(f"{module}:{line} -> {target} ({LAYERS[mine[0]][0]} may not import "
                             f"{LAYERS[theirs[0]][0]})")
    return sorted(set(found))


def read_project() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(), p.name == "__init__.py") for p in project_files()}


def test_every_import_follows_the_layers():
    assert violations(read_project()) == []


def test_an_upward_import_is_caught_even_inside_a_function():
    files = read_project()
    source, is_package = files["sd_lora.formats.kohya"]
    files["sd_lora.formats.kohya"] = (
        source + "\n\ndef _late():\n    from sd_lora.train.recipe import train\n", is_package)
    files["sd_lora.models.load"] = (files["sd_lora.models.load"][0] + "\nimport sd_lora.world\n",
                                    False)
    found = violations(files)
    assert any("sd_lora.formats.kohya" in v and "sd_lora.train.recipe" in v for v in found), found
    assert any("sd_lora.models.load" in v and "sd_lora.world" in v for v in found), found


def test_formats_import_no_model_library():
    files = read_project()
    files["sd_lora.formats.kohya"] = (files["sd_lora.formats.kohya"][0] + "\nimport peft\n", False)
    assert any("pure tables" in v for v in violations(files))


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    files = read_project()
    for module, (source, is_package) in files.items():
        graph[module] = {t for _, t in imports_of(source, module, is_package)
                         if t in files and t != module}
    cycles = []
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_every_module_has_a_layer():
    unplaced = [m for m in read_project() if layer_of(m) is None]
    assert unplaced == []


def test_few_modules_sit_directly_in_the_package():
    top = sorted(p.name for p in (ROOT / "sd_lora").glob("*.py"))
    assert len(top) <= 6, top


@pytest.mark.parametrize("module", ["sd_lora.config", "sd_lora.errors"])
def test_the_config_loads_without_torch(module, tmp_path):
    """A headless tool (or the app's form) reads and checks a config without the ML stack."""
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'diffusers', 'transformers', 'peft'}:\n"
        "            raise ImportError('blocked for the test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import {module}\n"
    )
    if module == "sd_lora.config":
        blocker += ("cfg = sd_lora.config.load_config('examples/demo.toml')\n"
                    "print(cfg.train.learning_rate)\n")
    result = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_package_is_installed():
    """pyproject.toml lists the packages by hand (the app's folder is installed under another
    name); a new folder left out of it would be missing from every install but this checkout."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sd_lora").rglob(
        "__init__.py")}
    assert folders | {"sd_lora_app"} == listed


def test_the_command_line_and_the_app_start_without_diffusers():
    """`sd-lora --help` stays quick, and the app sets its temporary folders before diffusers
    (whose import makes torch's compile cache in the temporary folder) is ever imported."""
    probe = ("import sys\n"
             "from sd_lora.cli.main import build_parser\n"
             "build_parser()\n"
             "import sd_lora_app.command\n"
             "print(sorted(m for m in ('diffusers', 'transformers', 'peft', 'gradio') "
             "if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_dtype_names_are_the_configs():
    """One list of dtype names: export.dtype's, which the torch table and the tools' --dtype use."""
    from typing import get_args

    from sd_lora.cli.tools import EXPORT_DTYPES
    from sd_lora.config import ExportDtype
    from sd_lora.util.dtypes import DTYPES

    assert set(DTYPES) == set(get_args(ExportDtype)) == set(EXPORT_DTYPES)
