"""Imports only run downward: contracts, libraries, stages, jobs and commands.

The layers (ARCHITECTURE.md draws them) from the bottom:
  0 schemas/                       the contracts
  1 transforms/model/, uris, gcs_auth, dataset
                                   libraries under the stages and the launcher
  2 transforms/ stage modules      listing, decode, inference, write, report
  3 transforms/composite.py        the public composite transforms
  4 pipeline/                      the job, the commands, the command line
A module may import its own layer or lower ones, never a higher one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from paths import ROOT

LIBRARIES = ("transforms.model", "transforms.uris", "transforms.gcs_auth",
             "transforms.dataset")


def layer(module: str) -> int | None:
    """The layer of a project module; None for anything else."""
    if module == "schemas" or module.startswith("schemas."):
        return 0
    if any(module == lib or module.startswith(lib + ".") for lib in LIBRARIES):
        return 1
    if module == "transforms.composite":
        return 3
    if module == "transforms":
        return 1  # the package itself only sets up GCS auth (lazy exports)
    if module.startswith("transforms."):
        return 2
    if module == "pipeline" or module.startswith("pipeline."):
        return 4
    return None


def imports_of(source: str, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import, also inside functions."""
    found = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + [base]).strip(".")
            found.append((node.lineno, base))
            # `from transforms import listing` imports transforms.listing
            for alias in node.names:
                found.append((node.lineno, f"{base}.{alias.name}"))
    return found


def upward_imports(source: str, module: str) -> list[str]:
    own = layer(module)
    problems = []
    for line, imported in imports_of(source, module):
        theirs = layer(imported)
        if theirs is None or own is None:
            continue
        # `from transforms import X` names the package; judge what it names.
        if imported in ("transforms", "pipeline", "schemas"):
            continue
        if theirs > own:
            problems.append(f"{module}:{line} imports {imported} "
                            f"(layer {theirs} > {own})")
    return problems


def project_modules():
    for package in ("schemas", "transforms", "pipeline"):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).with_suffix("")
            parts = list(relative.parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def test_no_module_imports_upward():
    problems = []
    for module, path in project_modules():
        problems += upward_imports(path.read_text(encoding="utf-8"), module)
    assert not problems, "\n".join(problems)


def test_every_project_module_has_a_layer():
    unplaced = [m for m, _ in project_modules() if layer(m) is None]
    assert not unplaced


@pytest.mark.parametrize("module, source, bad", [
    ("transforms.model.loading", "from pipeline.job import plan", True),
    ("transforms.inference", "import pipeline.options", True),
    ("transforms.decode", "def f():\n    from transforms.composite import EmbedImages", True),
    ("transforms.dataset", "from transforms import listing", True),
    ("schemas.output", "from transforms.uris import redact", True),
    ("pipeline.job", "from transforms.dataset import Dataset", False),
    ("transforms.write", "from transforms.dataset import Dataset", False),
])
def test_the_check_sees_an_upward_import(module, source, bad):
    assert bool(upward_imports(source, module)) == bad
