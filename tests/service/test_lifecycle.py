"""Readiness, failure isolation between models, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from service.server.app import GC_YOUNG_THRESHOLD
from tests.service import models as m
from tests.service.conftest import Server, TestModels, start_server, with_app


def _pixels() -> bytes:
    return orjson.dumps(
        {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}]}
    )


def test_broken_models_are_unavailable_with_a_reason_while_the_others_serve(broken_repository: Path):
    async def scenario(c):
        index = {e["name"]: e for e in (await c.post("/v2/repository/index")).json()}
        return (
            index,
            await c.get("/v2/health/ready"),
            await c.get("/v2/models/tiny-image/ready"),
            await c.get("/v2/models/bad-onnx/ready"),
            await c.get("/v2/models/bad-config/ready"),
            await c.post("/v2/models/tiny-image/infer", content=_pixels()),
            await c.post("/v2/models/bad-onnx/infer", content=_pixels()),
            (await c.get("/metrics")).text,
        )

    index, ready, good, bad_onnx, bad_config, infer_ok, infer_bad, metrics = with_app(
        broken_repository, scenario
    )
    assert index["tiny-image"]["state"] == "READY"
    assert index["bad-config"]["state"] == "UNAVAILABLE" and "colour_typo" in index["bad-config"]["reason"]
    assert (
        index["bad-onnx"]["state"] == "UNAVAILABLE"
        and "ONNX Runtime cannot load" in index["bad-onnx"]["reason"]
    )
    assert index["mismatch"]["state"] == "UNAVAILABLE" and "datatype" in index["mismatch"]["reason"]
    # Like Triton's strict readiness: the server is not ready while a model that should load is not.
    assert ready.status_code == 503 and ready.json()["code"] == "not_ready"
    assert good.status_code == 200
    assert bad_onnx.status_code == 503 and "INVALID_PROTOBUF" in bad_onnx.json()["error"]
    assert bad_config.status_code == 503 and "colour_typo" in bad_config.json()["error"]
    assert infer_ok.status_code == 200
    assert infer_bad.status_code == 503 and infer_bad.json()["code"] == "not_ready"
    assert 'neuroserve_model_state{model="bad-onnx",state="unavailable",version="1"} 1.0' in metrics
    assert 'neuroserve_model_state{model="tiny-image",state="ready",version="1"} 1.0' in metrics


def test_without_strict_readiness_one_ready_model_makes_the_server_ready(broken_repository: Path):
    async def scenario(c):
        return (await c.get("/v2/health/ready")).status_code

    assert with_app(broken_repository, scenario, strict_readiness=False) == 200


def _during_and_after_loading(repository: Path, during: list[str], after: list[str]
                              ) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """GET `during` right after start-up, while the models still load; then `after` once they are."""
    from service.server.app import create_app
    from service.settings import Settings

    async def main():
        app = create_app(Settings(model_repository=repository, intra_op_threads=1, grpc_port=0))
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t") as c,
        ):
            early = [await c.get(path) for path in during]
            await app.state.service.load_task
            return early, [await c.get(path) for path in after]

    return asyncio.run(main())


def test_live_answers_while_models_load_and_ready_follows_warm_up(test_models: TestModels):
    (live, ready_before), (ready_after,) = _during_and_after_loading(
        test_models.repository, ["/v2/health/live", "/v2/health/ready"], ["/v2/health/ready"])
    assert (live.status_code, ready_before.status_code, ready_after.status_code) == (200, 503, 200)


def test_health_probes_answer_head_as_well_as_get(server: Server):
    # Some load balancers probe with HEAD: same status, no body.
    for path in ("/v2/health/live", "/v2/health/ready"):
        head = httpx.head(f"{server.url}{path}")
        assert head.status_code == httpx.get(f"{server.url}{path}").status_code == 200, path
        assert head.content == b""


def test_a_readiness_probe_during_loading_is_not_counted_as_a_rejection(test_models: TestModels):
    from prometheus_client import REGISTRY

    from service.observability.metrics import UNKNOWN_MODEL

    def not_ready_rejections() -> float:
        return REGISTRY.get_sample_value("neuroserve_rejections_total",
                                         {"model": UNKNOWN_MODEL, "reason": "not_ready"}) or 0.0

    before = not_ready_rejections()
    (probe,), _ = _during_and_after_loading(test_models.repository, ["/v2/health/ready"], [])
    assert probe.status_code == 503 and probe.json()["code"] == "not_ready"
    assert not_ready_rejections() == before


def test_reload_picks_up_a_fixed_model_and_reports_failures(tmp_path: Path):
    m.image_model(tmp_path)
    broken = m.corrupt_onnx_model(tmp_path, "later")

    async def scenario(c):
        first = await c.post("/v2/repository/models/later/load")
        m.image_model(tmp_path, "later")  # fix it on disk
        (broken / "1" / "model.onnx").unlink()
        m.image_model(tmp_path, "later")
        second = await c.post("/v2/repository/models/later/load")
        ready = await c.get("/v2/models/later/ready")
        missing = await c.post("/v2/repository/models/nothing-here/load")
        return first, second, ready, missing

    first, second, ready, missing = with_app(tmp_path, scenario)
    assert first.status_code == 400 and first.json()["code"] == "load_failed"
    assert second.status_code == 200 and ready.status_code == 200
    assert missing.status_code == 404


def test_a_request_whose_model_is_unloaded_while_its_body_arrives_gets_503(test_models: TestModels,
                                                                            tmp_path: Path):
    # Requests are admitted before their body is read; an unload can close the version meanwhile.
    model = test_models.image
    body = orjson.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                     "data": [7] * 784}]})
    server = start_server(test_models.repository, tmp_path / "server.log")
    try:
        host, port = server.host_port.split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
            time.sleep(0.3)  # the handler has admitted it and waits for the rest of the body
            unload = httpx.post(f"{server.url}/v2/repository/models/{model}/unload", timeout=60)
            assert unload.status_code == 200
            s.sendall(body[100:])
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
                chunk = s.recv(65536)
                assert chunk, reply
                reply += chunk
        head, payload = reply.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503"), reply
        assert orjson.loads(payload)["code"] == "not_ready"
        assert httpx.post(f"{server.url}/v2/repository/models/{model}/load", timeout=60).status_code == 200
        assert httpx.post(f"{server.url}/v2/models/{model}/infer", content=body).status_code == 200
        assert "unhandled error" not in server.logs()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def drain_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("drain")
    m.slow_model(repo, width=768, max_batch=1, queue=16)
    return repo


def test_sigterm_answers_every_accepted_request_then_exits(drain_repository: Path, tmp_path: Path):
    # The slow graph is slow only on a CPU (a GPU finishes its matmuls before SIGTERM arrives).
    server = start_server(drain_repository, tmp_path / "server.log", "--providers", "cpu")
    try:
        body = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "waveform",
                        "datatype": "FP32",
                        "shape": [1, 768],
                        "data": np.linspace(-1, 1, 768).tolist(),
                    }
                ]
            }
        )
        n = 6
        barrier = threading.Barrier(n)

        def send() -> int:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                c.get("/v2/health/live")  # connected before the burst
                barrier.wait()
                return c.post("/v2/models/slow/infer", content=body).status_code

        pool = ThreadPoolExecutor(n)
        futures = [pool.submit(send) for _ in range(n)]
        # Wait until the service has accepted all of them, then ask it to stop.
        with httpx.Client(base_url=server.url, timeout=10) as c:
            deadline = time.monotonic() + 30
            inflight = 0.0
            while inflight < n and time.monotonic() < deadline:
                metrics = c.get("/metrics").text
                line = next(x for x in metrics.splitlines() if x.startswith("neuroserve_inflight_requests{"))
                inflight = float(line.split()[-1])
            assert inflight == n, "the requests should all be in flight when SIGTERM arrives"
            server.process.send_signal(signal.SIGTERM)
            refused = None
            while server.process.poll() is None and refused is None:
                try:
                    r = c.get("/v2/health/ready")
                    if r.status_code == 503:
                        refused = c.post("/v2/models/slow/infer", content=body)
                except httpx.TransportError:
                    break
        codes = [f.result(timeout=60) for f in futures]
        pool.shutdown()
        assert codes == [200] * n
        if refused is not None:  # the server was still draining when we asked
            assert refused.status_code == 503 and refused.json()["code"] == "not_ready"
        server.process.wait(30)
        assert server.process.returncode is not None
        assert "drained: no request in flight" in server.logs()
    finally:
        server.stop()


def test_app_runs_outside_the_main_thread_without_signal_handling(test_models: TestModels):
    # Only the main thread may install signal handlers; an app started elsewhere must still work.
    results = []

    def run():
        async def scenario(c):
            return (await c.get("/v2/health/live")).status_code

        results.append(with_app(test_models.repository, scenario))

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert results == [200]


def test_the_heap_is_frozen_once_models_load_and_released_at_shutdown(test_models: TestModels):
    # Full collections must not walk the long-lived start-up heap (a ~14 ms event-loop stall each),
    # young collections must not run every 700 allocations under load, and a stopped app must leave
    # nothing frozen behind for its garbage to hide in, nor its thresholds.
    async def scenario(c):
        await asyncio.sleep(0)  # the freeze runs as the load task's done-callback
        frozen, thresholds = gc.get_freeze_count(), gc.get_threshold()
        served = (await c.get("/v2/health/ready")).status_code
        return frozen, thresholds, served

    gc.unfreeze()
    before = gc.get_threshold()
    frozen, thresholds, served = with_app(test_models.repository, scenario)
    assert served == 200
    assert frozen > 10_000, frozen  # modules, onnxruntime, FastAPI, the models' sessions
    assert thresholds == (GC_YOUNG_THRESHOLD, *before[1:]) and before[0] < GC_YOUNG_THRESHOLD
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
