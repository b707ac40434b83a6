"""The module map of docs/design.md §7 holds: entry-point scripts import library modules only, never each other."""

from __future__ import annotations

import ast

import pytest
from conftest import REPO

ENTRY_POINTS = {"train", "train_tacotron2", "save_taco_mels", "inference", "evaluate", "bench", "prep_splits",
                "make_demo_corpus", "demo"}
PACKAGES = ("tacotron2", "hifigan")


def repo_modules() -> dict[str, str]:
    """Module name -> source, for the top-level scripts and the packages."""
    modules = {path.stem: path.read_text() for path in REPO.glob("*.py")}
    for package in PACKAGES:
        modules.update({(package if path.stem == "__init__" else f"{package}.{path.stem}"): path.read_text()
                        for path in (REPO / package).glob("*.py")})
    return modules


def imports_of(source: str, known: set[str]) -> set[str]:
    """The repo modules a source imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found & known


def test_every_script_is_an_entry_point_or_a_library_module():
    modules = repo_modules()
    scripts = {name for name, source in modules.items() if "__main__" in source}
    assert scripts == ENTRY_POINTS, "update ENTRY_POINTS and docs/design.md §7 together"


def test_no_module_imports_an_entry_point():
    modules = repo_modules()
    offenders = {name: sorted(imports_of(source, ENTRY_POINTS)) for name, source in modules.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_library_modules_form_no_cycle():
    modules = repo_modules()
    graph = {name: imports_of(source, set(modules)) - {name} for name, source in modules.items()
             if name not in ENTRY_POINTS}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt}))
                   for nxt in graph.get(start, ()))
    # (a package's __init__ only re-exports its modules; an import of the package is an import of those)
    graph = {name: {module for dep in deps for module in (graph[dep] if dep in PACKAGES else {dep})}
             for name, deps in graph.items() if name not in PACKAGES}
    assert [name for name in graph if reaches(name, name, {name})] == []


def test_comments_point_to_files_the_repo_has():
    for path in [*REPO.glob("*.py"), *(REPO / "tacotron2").glob("*.py"), *(REPO / "hifigan").glob("*.py"),
                 *(REPO / "tests").glob("*.py"), REPO / "README.md"]:
        if path.name == "test_design.py":
            continue
        assert "DESIGN.md" not in path.read_text(), f"{path.name} points to a DESIGN.md the repo does not have"
    assert (REPO / "docs" / "design.md").is_file()


@pytest.mark.slow
def test_every_entry_point_help_reads_right():
    """--help of every script: its usage example keeps its line breaks (a lone backslash at a docstring's line end
    would join two lines) and no flag says its default twice."""
    import re
    import subprocess
    import sys

    for script in sorted(ENTRY_POINTS):
        result = subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, (script, result.stderr[-2000:])
        description = result.stdout.split("\noptions:")[0]  # (an option's help may start with another flag)
        assert not re.search(r"\S {4,}--\w", description), (script, "a usage example lost a line break")
        assert not re.search(r"\(default[^)]*\)\s*\(default", result.stdout), (script, "a default said twice")
