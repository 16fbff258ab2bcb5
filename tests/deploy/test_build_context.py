"""What `docker build` sends and installs is enough: the .dockerignore'd build context holds the
package, its pinned versions (constraints.txt) and the models only, the package builds from it as
the Dockerfile's `pip install .[cpu]` does, and the service imports without the training code the
image leaves out.

No Docker engine is needed: the context is assembled by reading .dockerignore, and the wheel is
built with the virtual environment's pip and setuptools."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy.support import ROOT


def dockerignore_patterns() -> list[tuple[bool, str]]:
    """(include?, pattern) in file order; Docker applies the last pattern that matches."""
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((True, line[1:].rstrip("/")) if line.startswith("!") else (False, line.rstrip("/")))
    return out


def in_context(relative: str, patterns: list[tuple[bool, str]]) -> bool:
    included = True
    parts = relative.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for include, pattern in patterns:
        if pattern.startswith("**/"):
            matched = any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        else:
            matched = any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)
        if matched:
            included = include
    return included


def context_files() -> list[str]:
    patterns = dockerignore_patterns()
    includes = [pattern for include, pattern in patterns if include]
    files = []
    for directory, dirs, names in os.walk(ROOT):
        relative_dir = Path(directory).relative_to(ROOT).as_posix().removeprefix(".")
        # Skip walking what is excluded and holds nothing re-included (.venv, .git, data caches).
        dirs[:] = [d for d in dirs
                   if in_context(f"{relative_dir}/{d}".lstrip("/"), patterns)
                   or any(p.startswith(f"{relative_dir}/{d}".lstrip("/") + "/") for p in includes)]
        for name in names:
            relative = f"{relative_dir}/{name}".lstrip("/")
            if in_context(relative, patterns):
                files.append(relative)
    return sorted(files)


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("context")
    for relative in context_files():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, root / relative)
    return root


def test_context_holds_the_package_and_models_only():
    files = context_files()
    top = {"pyproject.toml", "README.md", "constraints.txt", "service", "models"}
    assert {"pyproject.toml", "README.md", "constraints.txt", "service/__init__.py"} <= set(files)
    strays = [f for f in files if f.split("/")[0] not in top]
    assert strays == []
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


def test_package_builds_from_the_context_with_every_service_module(context: Path, tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(context)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("neuroserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "service").rglob("*.py")}
    assert modules <= names
    assert "neuroserve = service.cli:main" in entry_points


def test_service_imports_without_the_training_package(context: Path):
    # `training` is not in the image: make importing it fail, and import the service from the context.
    code = ("import sys; sys.modules['training'] = None; sys.path.insert(0, sys.argv[1]); "
            "import service.server.app, service.cli; "
            "assert service.server.app.__file__.startswith(sys.argv[1])")
    result = subprocess.run([sys.executable, "-c", code, str(context)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
