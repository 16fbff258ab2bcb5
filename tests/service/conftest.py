"""Fixtures: model repositories built from small ONNX graphs, a real server in a subprocess, and an
in-process app for fine-grained cases.

Set NEUROSERVE_TEST_MODEL_REPOSITORY=models to run the same tests against the shipped models (the
first image, text and speech model found there); the slow/fragile/broken models stay synthetic.
"""

from __future__ import annotations

import asyncio
import os
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.core.runtime import cuda_available
from tests.service import models as m

# Re-exported: test modules import these from here too.
from tests.service.servers import ROOT, Server, free_port, start_server  # noqa: F401

# Servers here run with `--providers auto`: on CUDA wherever this onnxruntime has it. Expected values
# come from CPU sessions, and CUDA's kernels (TF32 matrix units) moved probabilities by up to 2.6e-3
# on an NVIDIA H100.
SERVED_PROVIDER = "CUDAExecutionProvider" if cuda_available() else "CPUExecutionProvider"
TOL = {"rtol": 2e-2, "atol": 5e-3} if cuda_available() else {"rtol": 1e-5, "atol": 1e-6}


@dataclass(frozen=True)
class TestModels:
    __test__ = False  # not a test class
    repository: Path
    image: str
    text: str
    audio: str


def _shipped(shipped: Path, repo: Path) -> TestModels:
    """The first shipped model of each task (linked into `repo`); synthetic ones for missing tasks."""
    by_task: dict[str, str] = {}
    for d in sorted(shipped.iterdir()):
        if (d / "config.toml").is_file():
            task = tomllib.loads((d / "config.toml").read_text())["task"]
            if task not in by_task:
                by_task[task] = d.name
                (repo / d.name).symlink_to(d, target_is_directory=True)
    if "image" not in by_task:
        by_task["image"] = m.image_model(repo, versions=(1, 2)).name
    if "text" not in by_task:
        by_task["text"] = m.text_model(repo).name
    if "speech" not in by_task:
        by_task["speech"] = m.audio_model(repo).name
    return TestModels(repo, by_task["image"], by_task["text"], by_task["speech"])


@pytest.fixture(scope="session")
def test_models(tmp_path_factory: pytest.TempPathFactory) -> TestModels:
    repo = tmp_path_factory.mktemp("models")
    shipped = os.environ.get("NEUROSERVE_TEST_MODEL_REPOSITORY")
    if shipped:
        return _shipped(Path(shipped).resolve(), repo)
    m.image_model(repo, versions=(1, 2))
    m.text_model(repo)
    m.audio_model(repo)
    return TestModels(repo, "tiny-image", "tiny-text", "tiny-audio")


@pytest.fixture(scope="session")
def special_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models made to be slow or to fail, next to a healthy one."""
    repo = tmp_path_factory.mktemp("special")
    m.image_model(repo)
    m.slow_model(repo)
    m.fragile_model(repo)
    return repo


@pytest.fixture(scope="session")
def broken_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("broken")
    m.image_model(repo)
    m.broken_config_model(repo)
    m.corrupt_onnx_model(repo)
    m.mismatched_model(repo)
    return repo


# -- a real server in a subprocess (helpers in tests/service/servers.py) ------------------------


@pytest.fixture(scope="session")
def server(test_models: TestModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(test_models.repository, tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


# -- the app in this process ------------------------------------------------------------------------


@asynccontextmanager
async def running_app(repo: Path, **settings: object) -> AsyncIterator[httpx.AsyncClient]:
    """The ASGI app with its lifespan, models loaded, behind an httpx client (no sockets)."""
    from service.server.app import create_app
    from service.settings import Settings

    settings = {"grpc_port": 0, **settings}  # no gRPC server on the shared default port
    app = create_app(Settings(model_repository=repo, intra_op_threads=1, access_log=False, **settings))
    async with app.router.lifespan_context(app):
        state = app.state.service
        while state.repository.loading or state.load_task is None or not state.load_task.done():
            await asyncio.sleep(0.02)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://neuroserve.test", timeout=30) as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


def with_app(repo: Path, scenario, **settings: object):
    """Run `await scenario(client)` against a freshly started in-process app; return its result."""

    async def main():
        async with running_app(repo, **settings) as client:
            return await scenario(client)

    return asyncio.run(main())
