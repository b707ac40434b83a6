"""docs/design.md §7, the module map, holds: its block lists every module of the repo (every .py file outside tests/,
and inference.ipynb) with exactly what it imports from the repo, an AST scan of the code says so; the scripts are its
entry points, which no module imports; the library modules form no cycle."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import REPO

DESIGN = REPO / "docs" / "design.md"
NOTEBOOK = "inference.ipynb"
# The sections of the map's block, as its comment lines name them.
LIBRARY, ENTRY_POINTS, OUTSIDE_TOOLS, NOTEBOOKS = "library modules", "entry points", "for outside tools", "notebook"
NONE = "(none)"


# --------------------------------------------------------------------------------------------- the code

def module_name(key: str) -> str:
    """A map key as an importable name: 'train.py' -> 'train', 'tacotron2/__init__.py' -> 'tacotron2'."""
    if not key.endswith(".py"):
        return key
    parts = key.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files() -> dict[str, Path]:
    """Module name -> file, for every .py file of the repo outside tests/ (and outside hidden folders, virtual
    environments and other repositories inside this one)."""
    found = {}
    for folder, subfolders, files in os.walk(REPO):
        here = Path(folder)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith((".", "__")) and
                               not (here == REPO and name == "tests") and
                               not (here / name / "pyvenv.cfg").exists() and not (here / name / ".git").exists())
        for name in files:
            if name.endswith(".py"):
                path = here / name
                found[module_name(path.relative_to(REPO).as_posix())] = path
    return found


def packages(files: dict[str, Path]) -> set[str]:
    return {name for name, path in files.items() if path.name == "__init__.py"}


def notebook_source(path: Path) -> str:
    """The code cells of a notebook as one module, IPython's %magics and !commands left out."""
    cells = [cell for cell in json.loads(path.read_text(encoding="utf-8"))["cells"] if cell["cell_type"] == "code"]
    lines = [line for cell in cells for line in "".join(cell["source"]).splitlines() + [""]]
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def imports_of(source: str, module: str, modules: set[str], is_package: bool = False) -> set[str]:
    """The repo modules `source` (module `module`) imports: at the top or inside functions, relatively, or by
    importlib.import_module("name") (hubconf.py). `from package import name` counts as the submodule when `name` is
    one, else as the package."""
    def resolve(name: str) -> str | None:  # the longest prefix of a dotted name that is a repo module
        parts = name.split(".")
        return next((".".join(parts[:end]) for end in range(len(parts), 0, -1) if ".".join(parts[:end]) in modules),
                    None)

    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        else:
            continue
        found |= {resolved for resolved in map(resolve, names) if resolved}
    return found - {module}


def is_script(tree: ast.Module) -> bool:
    """Whether a module runs as a command: a top-level `if __name__ == "__main__":`."""
    return any(isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
               and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"' for node in tree.body)


class Scan(NamedTuple):
    imports: dict[str, set[str]]  # map key ('utils', 'train.py', 'inference.ipynb') -> repo modules it imports
    scripts: set[str]  # the keys of the .py files that run as commands (`if __name__ == "__main__":`)


def scan_repo(map_keys: set[str]) -> Scan:
    """The repo as it is, keyed as the map keys it: a module by its dotted name, unless the map names its file."""
    files = python_files()
    modules = set(files)
    package_names = packages(files)
    imports, scripts = {}, set()
    for name, path in files.items():
        source = path.read_text(encoding="utf-8")
        script = is_script(ast.parse(source))
        file_key = path.relative_to(REPO).as_posix()
        key = file_key if file_key in map_keys or (name not in map_keys and script) else name
        imports[key] = imports_of(source, name, modules, is_package=name in package_names)
        if script:
            scripts.add(key)
    for path in REPO.glob("*.ipynb"):
        imports[path.name] = imports_of(notebook_source(path), "__notebook__", modules)
    return Scan(imports, scripts)


# --------------------------------------------------------------------------------------------- the map

class MapLine(NamedTuple):
    number: int  # in docs/design.md, 1-based
    text: str
    section: str
    imports: set[str]


def read_map() -> tuple[dict[str, MapLine], tuple[int, int]]:
    """The lines `name <- a, b, c` of the fenced block in docs/design.md's "Module map" section, by name; and the
    block's first and last line numbers."""
    lines = DESIGN.read_text(encoding="utf-8").splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("## ") and "Module map" in line)
    opening = next(i for i in range(heading, len(lines)) if lines[i].startswith("```"))
    closing = next(i for i in range(opening + 1, len(lines)) if lines[i].startswith("```"))
    entries, section = {}, None
    for index in range(opening + 1, closing):
        text = lines[index].rstrip()
        if text.startswith("#"):
            section = text.lstrip("# ").partition(":")[0].strip()
            assert section in (LIBRARY, ENTRY_POINTS, OUTSIDE_TOOLS, NOTEBOOKS), (
                f"docs/design.md line {index + 1}: unknown section {section!r} in the module map")
            continue
        if not text.strip():
            continue
        name, arrow, imported = text.partition("<-")
        assert arrow and section, f"docs/design.md line {index + 1}: expected `# <section>` or `name <- imports`"
        imported = set() if imported.strip() == NONE else {item.strip() for item in imported.split(",")}
        assert name.strip() not in entries, f"docs/design.md line {index + 1}: {name.strip()} is listed twice"
        entries[name.strip()] = MapLine(index + 1, text, section, imported)
    return entries, (opening + 2, closing)


def map_line(name: str, imported: set[str], like: str | None = None) -> str:
    """The map's line for `name`, its arrow where `like` (the line it replaces) has it."""
    width = like.index("<-") if like else 28
    return f"{name:<{width - 1}} <- {', '.join(sorted(imported)) or NONE}"


def section_of(name: str, scan: Scan) -> str:
    if name.endswith(".ipynb"):
        return NOTEBOOKS
    return ENTRY_POINTS if name in scan.scripts else OUTSIDE_TOOLS if name.endswith(".py") else LIBRARY


def test_module_map_lists_every_module_and_its_imports():
    entries, (first, last) = read_map()
    scan = scan_repo(set(entries))
    fixes = []
    for name, imported in sorted(scan.imports.items()):
        if name not in entries:
            fixes.append(f"add `{map_line(name, imported)}` to the map's block (lines {first}-{last}), under "
                         f"`# {section_of(name, scan)}`")
        elif entries[name].imports != imported:
            entry = entries[name]
            fixes.append(f"line {entry.number}: `{entry.text}` -> `{map_line(name, imported, entry.text)}`")
    for name, entry in entries.items():
        if name not in scan.imports:
            fixes.append(f"line {entry.number}: remove `{entry.text}`: the repo has no {name} (outside tests/)")
    if fixes:
        pytest.fail("docs/design.md's module map (§7) differs from the code; change it so:\n" + "\n".join(fixes),
                    pytrace=False)


def test_entry_points_are_the_scripts_and_nothing_imports_them():
    entries, _ = read_map()
    scan = scan_repo(set(entries))
    fixes = [f"line {entry.number}: `{entry.text}` belongs under `# {section_of(name, scan)}`"
             for name, entry in entries.items() if name in scan.imports and entry.section != section_of(name, scan)]
    fixes += [f"line {entry.number}: `{entry.text}`: name the file of an entry point or a file for outside tools "
              f"(`{name.replace('.', '/')}.py`), and a library module by its import name"
              for name, entry in entries.items()
              if (entry.section in (ENTRY_POINTS, OUTSIDE_TOOLS)) != name.endswith(".py")]
    if fixes:
        pytest.fail("docs/design.md's module map (§7):\n" + "\n".join(fixes), pytrace=False)
    # Only the notebook (and the tests) may import an entry point or a file for outside tools.
    commands = {module_name(name) for name, entry in entries.items() if entry.section in (ENTRY_POINTS, OUTSIDE_TOOLS)}
    offenders = {name: sorted(imported & commands) for name, imported in scan.imports.items() if name != NOTEBOOK}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_every_entry_point_runs_through_run_cli():
    """One command-line convention: `main(argv=None)` raises UserError, `if __name__ == "__main__": run_cli(main)`
    prints it as one line and exits 1 (no script catches it, or prints warnings, its own way)."""
    entries, _ = read_map()
    wrong = []
    for name, entry in entries.items():
        if entry.section != ENTRY_POINTS:
            continue
        tree = ast.parse((REPO / name).read_text(encoding="utf-8"))
        block = next(node for node in tree.body if is_script(ast.Module([node], [])))
        calls = {ast.unparse(node) for node in ast.walk(block) if isinstance(node, ast.Call)}
        main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
        handlers = {ast.unparse(handler.type) for statement in main.body if isinstance(statement, ast.Try)
                    for handler in statement.handlers if handler.type is not None}
        if "run_cli(main)" not in calls or "UserError" in handlers:
            wrong.append(name)
    assert wrong == [], "end these in `run_cli(main)`, and let main's UserErrors through to it"


def test_library_modules_form_no_cycle():
    entries, _ = read_map()
    scan = scan_repo(set(entries))
    library = {name: imported for name, imported in scan.imports.items() if section_of(name, scan) == LIBRARY}
    package_names = packages(python_files())
    # A package's __init__ only re-exports its modules: an import of the package is an import of those.
    graph = {name: {module for dep in deps for module in (library.get(dep, set()) if dep in package_names else {dep})}
             for name, deps in library.items() if name not in package_names}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt}))
                   for nxt in graph.get(start, ()))
    assert [name for name in graph if reaches(name, name, {name})] == []


def test_the_scan_reads_every_kind_of_import(tmp_path):
    modules = {"utils", "model", "pkg", "pkg.a", "pkg.b", "hub"}
    source = ("import utils\nfrom pkg import a, helper\nfrom . import b\nfrom .a import thing\n"
              "def f():\n    import importlib\n    return importlib.import_module('hub')\nimport numpy\n")
    assert imports_of(source, "pkg.c", modules) == {"utils", "pkg.a", "pkg", "pkg.b", "hub"}
    assert imports_of("from . import a\n", "pkg", modules, is_package=True) == {"pkg.a"}
    notebook = tmp_path / "x.ipynb"
    notebook.write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "source": ["import model"]},
        {"cell_type": "code", "source": ["%matplotlib inline\n", "!ls\n", "from utils import load_audio"]}]}))
    assert imports_of(notebook_source(notebook), "__notebook__", modules) == {"utils"}
    assert is_script(ast.parse("if __name__ == '__main__':\n    main()\n"))
    assert not is_script(ast.parse('"""if __name__ == "__main__": run_cli(main)"""\ndef f():\n    pass\n'))


def test_comments_point_to_files_the_repo_has():
    for path in [*python_files().values(), *(REPO / "tests").glob("*.py"), REPO / "README.md", REPO / NOTEBOOK]:
        if path.name == "test_design.py":
            continue
        assert "DESIGN.md" not in path.read_text(), f"{path.name} points to a DESIGN.md the repo does not have"
    assert DESIGN.is_file()


@pytest.mark.slow
def test_every_entry_point_help_reads_right():
    """--help of every script: its usage example keeps its line breaks (a lone backslash at a docstring's line end
    would join two lines) and no flag says its default twice."""
    import re
    import subprocess
    import sys

    entries, _ = read_map()
    for script in sorted(name for name, entry in entries.items() if entry.section == ENTRY_POINTS):
        result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, (script, result.stderr[-2000:])
        description = result.stdout.split("\noptions:")[0]  # (an option's help may start with another flag)
        assert not re.search(r"\S {4,}--\w", description), (script, "a usage example lost a line break")
        assert not re.search(r"\(default[^)]*\)\s*\(default", result.stdout), (script, "a default said twice")
