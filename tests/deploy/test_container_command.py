"""The image's own start command and HEALTHCHECK, run on this machine: what the container would run.

The default (CPU) stage of the Dockerfile is parsed; its CMD runs unchanged with the image's ENV,
except for what differs between a container and this machine: the virtual environment's location,
the model repository (the tiny test repository instead of /models), and the address (127.0.0.1 and
a free port instead of 0.0.0.0:8000)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.deploy.conftest import IMAGE_LABELS, IMAGE_SIZE
from tests.deploy.dockerfile import Stage, parse
from tests.deploy.support import ROOT, VENV_BIN, background, free_port, tail, wait_until

DOCKERFILE = ROOT / "Dockerfile"
IMAGE_VENV = "/opt/venv/bin"


def container_env(stage: Stage, **overrides: str) -> dict[str, str]:
    env = {**os.environ, **stage.env}
    env["PATH"] = stage.env["PATH"].replace(IMAGE_VENV, str(VENV_BIN)).replace("$PATH", os.environ["PATH"])
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def image() -> Stage:
    return parse(DOCKERFILE)[-1]


@pytest.fixture(scope="module")
def started(image: Stage, model_repository: Path, tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    assert image.env["PATH"].startswith(IMAGE_VENV + ":")
    port = free_port()
    env = container_env(image, NEUROSERVE_MODEL_REPOSITORY=str(model_repository),
                        NEUROSERVE_HOST="127.0.0.1", NEUROSERVE_PORT=str(port),
                        NEUROSERVE_GRPC_PORT=str(free_port()))
    log = tmp_path_factory.mktemp("container-command") / "service.log"
    url = f"http://127.0.0.1:{port}"
    with background(image.cmd, env=env, log=log) as proc:
        try:
            wait_until(lambda: httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200,
                       timeout=90, what="the image's command to serve a ready service", proc=proc)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- log ---\n{tail(log)}") from None
        yield url, env


def test_start_command_takes_repository_and_address_from_the_image_env(image: Stage):
    script = image.cmd[2]
    for var in ("NEUROSERVE_MODEL_REPOSITORY", "NEUROSERVE_HOST", "NEUROSERVE_PORT"):
        assert f'"${var}"' in script
    assert image.env["NEUROSERVE_MODEL_REPOSITORY"] == "/models"
    assert image.env["NEUROSERVE_HOST"] == "0.0.0.0"
    assert image.env["NEUROSERVE_PORT"] == "8000"
    assert image.env["NEUROSERVE_GRPC_PORT"] == "8001"


def test_start_command_serves_the_repository_and_predicts(started):
    url, _ = started
    assert httpx.get(f"{url}/v2/health/live", timeout=5).status_code == 200
    pixels = np.full((1, 1, IMAGE_SIZE, IMAGE_SIZE), 200, dtype=np.uint8)
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                        "data": pixels.ravel().tolist()}]}
    response = httpx.post(f"{url}/v2/models/tiny-image/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["name"] == "probabilities"
    assert output["shape"] == [1, len(IMAGE_LABELS)]
    assert sum(output["data"]) == pytest.approx(1.0, abs=1e-5)


def healthcheck(image: Stage, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(image.healthcheck, env=env, capture_output=True, text=True, timeout=10, check=False)


def test_healthcheck_command_passes_against_the_ready_service(image: Stage, started):
    _, env = started
    result = healthcheck(image, env)
    assert result.returncode == 0, result.stderr


def test_healthcheck_command_fails_when_nothing_answers(image: Stage, started):
    _, env = started
    assert healthcheck(image, {**env, "NEUROSERVE_PORT": str(free_port())}).returncode != 0


def test_start_command_serves_grpc_on_the_env_port(started):
    import tritonclient.grpc as triton

    _, env = started
    with triton.InferenceServerClient(f"127.0.0.1:{env['NEUROSERVE_GRPC_PORT']}") as client:
        assert client.is_server_ready()
        assert client.get_model_metadata("tiny-image").name == "tiny-image"
