"""The package's shape, as a newcomer reads it: rooms that import only downward and never in a circle (the
import-linter contracts in pyproject.toml, which ``make lint`` checks too), the project's own imports at the top of
each module (none placed inside a function to dodge a cycle), no private name imported from another module, short
functions and modules, and a repository that speaks of the project only."""

from __future__ import annotations

import ast
import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mfsr_fast", "training", "kernels", "benchmarks")
# Modules allowed past the module length: the kernels (one op top to bottom, STYLE.md) and the transformer (one
# readable module per model family).
LONG_MODULES = ("kernels/", "mfsr_fast/models/transformer.py")
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 500


def _sources() -> dict[str, ast.Module]:
    paths = sorted(p for pkg in PACKAGES for p in glob.glob(os.path.join(ROOT, pkg, "**", "*.py"), recursive=True))
    return {os.path.relpath(p, ROOT): ast.parse(open(p).read(), p) for p in paths}


def _own(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in PACKAGES


def test_import_contracts_hold():
    """The rooms' order (training > mfsr_fast > kernels; apps > evaluation > pipeline > sampling > models > io) and no
    cycle anywhere, with every import counted (those inside functions too)."""
    pytest.importorskip("importlinter", reason="import-linter is in the lint extra (pip install -e '.[lint]')")
    from importlinter.cli import lint_imports

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert lint_imports(no_cache=True) == 0, "lint-imports: a contract is broken (run it to see which)"
    finally:
        os.chdir(cwd)


def test_own_imports_are_at_the_top_and_public():
    inside, private = [], []
    for path, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if (isinstance(sub, ast.ImportFrom) and _own(sub.module)) or (
                            isinstance(sub, ast.Import) and any(_own(a.name) for a in sub.names)):
                        inside.append(f"{path}:{sub.lineno}")
            if isinstance(node, ast.ImportFrom) and _own(node.module):
                private += [f"{path}:{node.lineno} {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not inside, f"imports of the project's own modules inside functions: {inside}"
    assert not private, f"private names imported from another module: {private}"


def test_functions_and_modules_are_short():
    long_functions, long_modules = [], []
    for path, tree in _sources().items():
        if path.startswith("kernels/"):
            continue
        lines = len(open(os.path.join(ROOT, path)).read().splitlines())
        if lines > MAX_MODULE_LINES and not path.startswith(LONG_MODULES):
            long_modules.append(f"{path} ({lines})")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path}:{node.lineno} {node.name} ({node.end_lineno - start + 1})")
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"


def test_the_repository_speaks_of_the_project_only():
    """The history is git's: tracked text says what holds now, not who worked when, on which machine, or what an
    issue asked."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    pattern = re.compile(r"\bsessions?\b|\bwas lent\b|no GPU (was )?lent|\bissue #?\d+", re.IGNORECASE)
    found = []
    for rel in files.stdout.split():
        if rel.endswith((".md", ".py", ".sh", ".toml", ".cfg", "Makefile")) and rel != "tests/test_layout.py":
            for i, line in enumerate(open(os.path.join(ROOT, rel), errors="replace"), 1):
                if pattern.search(line):
                    found.append(f"{rel}:{i}")
    assert not found, f"tracked text tells the project's history instead of its state: {found[:20]}"
