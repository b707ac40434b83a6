"""requirements.lock agrees with requirements*.txt, pins every version exactly, and is what this environment runs.

`make setup` installs exactly the lock, so a package installed at another version than the lock's means the Makefile
stopped using it (or the venv was changed by hand). torch is the one package left out of the lock: the Makefile's
TORCH chooses the build (the CPU wheel here, a CUDA one on a GPU box), so no nvidia-*/CUDA package may be pinned.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK_FIX = "run `make lock`"
SETUP_FIX = ("reinstall exactly the lock (`rm -f .venv/.installed && make setup`), "
             "and check that the Makefile's setup still installs `-r requirements.lock`")
UNPINNED = {"torch"}  # the Makefile's TORCH pins it, per machine
GPU_ONLY = re.compile(r"^(nvidia-.*|.*cuda.*|triton)$")  # what only a CUDA build of torch pulls in


def _logical_lines(path: Path) -> list[str]:
    """The file's lines without comments or blanks, with backslash continuations joined."""
    lines, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if line:
            lines.append(line)
    return lines


def read_requirements(path: Path) -> list[tuple[Path, Requirement]]:
    """(file it came from, requirement) for every requirement in `path`, following `-r` includes."""
    found = []
    for line in _logical_lines(path):
        include = re.fullmatch(r"(?:-r|--requirement)[\s=]+(\S+)", line)
        if include:
            found += read_requirements(path.parent / include.group(1))
        elif line.startswith("-"):
            raise ValueError(f"{path.name}: this checker does not understand the option line {line!r}")
        else:
            found.append((path, Requirement(line)))
    return found


def read_lock(lock: Path) -> tuple[dict[str, Requirement], list[str]]:
    """(canonical name -> its exact pin, problems with lines that are not exact pins)."""
    pins: dict[str, Requirement] = {}
    problems = []
    for line in _logical_lines(lock):
        line = " ".join(token for token in line.split() if not token.startswith("--hash"))
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            problems.append(f"{line!r}: {lock.name} may hold only `name==version` lines; {LOCK_FIX}")
            continue
        name = canonicalize_name(requirement.name)
        specifiers = list(requirement.specifier)
        exact = (len(specifiers) == 1 and specifiers[0].operator in ("==", "===")
                 and "*" not in specifiers[0].version and requirement.url is None)
        if not exact:
            problems.append(f"{name}: {lock.name} has {line!r}, not an exact `==` pin; {LOCK_FIX}")
        elif name in pins:
            problems.append(f"{name}: {lock.name} pins it twice ({pins[name]} and {requirement}); {LOCK_FIX}")
        else:
            pins[name] = requirement
    return pins, problems


def lock_problems(requirements: Path, lock: Path) -> list[str]:
    """Everything that makes `lock` not an exact, CPU-only pin set satisfying `requirements` (and its includes)."""
    pins, problems = read_lock(lock)
    for name in pins:
        if name in UNPINNED:
            problems.append(f"{name}: {lock.name} pins it, but the Makefile's TORCH chooses it per machine; "
                            f"{LOCK_FIX} (it passes `--unsafe-package torch`)")
        elif GPU_ONLY.match(name):
            problems.append(f"{name}: a CUDA package in {lock.name}, so it was resolved against a CUDA torch; "
                            f"{LOCK_FIX} where pip finds the CPU wheel of the Makefile's LOCK_TORCH")
    for source, requirement in read_requirements(requirements):
        name = canonicalize_name(requirement.name)
        if name in UNPINNED or (requirement.marker is not None and not requirement.marker.evaluate()):
            continue
        if name not in pins:
            problems.append(f"{name}: {source.name} asks for {requirement} but {lock.name} does not pin it; "
                            f"{LOCK_FIX}")
            continue
        pinned = next(iter(pins[name].specifier)).version
        if not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(f"{name}: {source.name} asks for {requirement} but {lock.name} pins {pinned}; "
                            f"{LOCK_FIX}")
    return problems


def installed_versions() -> dict[str, str]:
    """Canonical name -> version of every distribution this interpreter imports (the first one on sys.path wins)."""
    versions: dict[str, str] = {}
    for distribution in metadata.distributions():
        versions.setdefault(canonicalize_name(distribution.metadata["Name"]), distribution.version)
    return versions


def environment_problems(lock: Path, installed: Callable[[], dict[str, str]] = installed_versions) -> list[str]:
    """Every package the lock pins that this environment lacks or has at another version."""
    pins, _ = read_lock(lock)
    versions = installed()
    problems = []
    for name, requirement in pins.items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        if name not in versions:
            problems.append(f"{name}: {lock.name} pins {requirement} but it is not installed; {SETUP_FIX} "
                            f"(or {LOCK_FIX} if the lock itself is stale)")
        elif not requirement.specifier.contains(versions[name], prereleases=True):
            problems.append(f"{name}: {lock.name} pins {requirement} but {versions[name]} is installed; "
                            f"{SETUP_FIX} (or {LOCK_FIX} if the lock itself is stale)")
    return problems


def test_lock_satisfies_the_requirements_with_exact_cpu_only_pins():
    problems = lock_problems(REPO / "requirements-dev.txt", REPO / "requirements.lock")
    assert not problems, "\n".join(problems)


def test_environment_is_exactly_the_lock():
    problems = environment_problems(REPO / "requirements.lock")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_broken_lock(tmp_path):
    (tmp_path / "requirements.txt").write_text("torch>=2.1\naccelerate>=1.0\nCharset_Normalizer\nlibrosa>=0.10  # why\n"
                                               "only-on-windows ; sys_platform == 'win32'\n")
    (tmp_path / "requirements-dev.txt").write_text("-r requirements.txt\npytest\nruff>=0.5\n")
    (tmp_path / "requirements.lock").write_text(
        "# generated\naccelerate==0.34.2\n    # via -r requirements.txt\ncharset-normalizer==3.5.3\n"
        "librosa>=0.10\npytest==9.2.0 \\\n    --hash=sha256:00\ntorch==2.13.0\nnvidia-cublas-cu12==12.8.4.1\n")
    problems = lock_problems(tmp_path / "requirements-dev.txt", tmp_path / "requirements.lock")
    expected = {"accelerate": "pins 0.34.2", "librosa": "not an exact `==` pin", "ruff": "does not pin it",
                "torch": "TORCH chooses it", "nvidia-cublas-cu12": "a CUDA package"}
    for name, words in expected.items():
        assert any(p.startswith(f"{name}:") and words in p and LOCK_FIX in p for p in problems), (name, problems)
    # charset-normalizer (spelt another way), pytest (with a hash) and only-on-windows (not for this platform): fine
    assert {p.split(":")[0] for p in problems} == set(expected), problems

    installed = {"accelerate": "0.34.2", "charset-normalizer": "3.5.4", "torch": "2.13.0+cpu"}
    problems = environment_problems(tmp_path / "requirements.lock", lambda: installed)
    expected = {"charset-normalizer": "3.5.4 is installed", "pytest": "not installed",
                "nvidia-cublas-cu12": "not installed"}  # torch 2.13.0+cpu satisfies ==2.13.0, as for pip
    for name, words in expected.items():
        assert any(p.startswith(f"{name}:") and words in p and LOCK_FIX in p for p in problems), (name, problems)
    assert {p.split(":")[0] for p in problems} == set(expected), problems

    # The real files, copied, pass; one changed requirement makes them fail.
    for name in ("requirements.txt", "requirements-dev.txt", "requirements.lock"):
        (tmp_path / name).write_text((REPO / name).read_text())
    assert not lock_problems(tmp_path / "requirements-dev.txt", tmp_path / "requirements.lock")
    (tmp_path / "requirements.txt").write_text((REPO / "requirements.txt").read_text() + "accelerate>=99\n")
    problems = lock_problems(tmp_path / "requirements-dev.txt", tmp_path / "requirements.lock")
    assert len(problems) == 1 and problems[0].startswith("accelerate:") and LOCK_FIX in problems[0], problems
