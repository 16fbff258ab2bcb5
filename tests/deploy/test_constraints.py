"""constraints.txt pins every package that `make` and the Docker images install, and the environment
the tests run in holds exactly those versions (so the tests and benchmarks describe what a fresh
machine gets)."""

from __future__ import annotations

import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.support import ROOT


def pins() -> dict[str, Requirement]:
    out: dict[str, Requirement] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in out, f"{req.name} is pinned twice"
        out[name] = req
    return out


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def test_every_pin_is_one_exact_version():
    for name, req in pins().items():
        (spec,) = req.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"{name}: {req}"


def test_every_declared_dependency_is_pinned_within_its_declared_range():
    pinned = pins()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req} (pyproject.toml) has no pin in constraints.txt"
        version = next(iter(pinned[name].specifier)).version
        assert req.specifier.contains(version, prereleases=True), f"pin {pinned[name]} is outside {req}"


def test_cpu_and_cuda_onnxruntime_are_the_same_release():
    pinned = pins()
    assert str(pinned["onnxruntime"].specifier) == str(pinned["onnxruntime-gpu"].specifier)


def test_this_environment_holds_the_pinned_versions():
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    checked, wrong = 0, []
    for name, req in pins().items():
        if name in installed:
            checked += 1
            if not req.specifier.contains(installed[name], prereleases=True):
                wrong.append(f"{name} {installed[name]} (pinned {req.specifier})")
    assert not wrong, f"run `make dev-venv` to install the pinned versions: {wrong}"
    # Everything the tests need is installed, so most pins were compared (all but the other
    # onnxruntime wheel).
    assert checked >= len(pins()) - 1
