"""The V2 gRPC API: a real `tritonclient.grpc` client (sync, asyncio and streaming) and plain gRPC
stubs against a real server process on 127.0.0.1, with ONNX Runtime in this process as reference."""

from __future__ import annotations

import asyncio
import queue
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.service import models as m
from tests.service.conftest import TOL, Server, TestModels, free_port, start_server


@pytest.fixture(scope="module")
def grpc_server(
    test_models: TestModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str]]:
    port = free_port()
    srv = start_server(test_models.repository, tmp_path_factory.mktemp("grpc") / "server.log",
                       "--grpc-port", str(port))
    yield srv, f"127.0.0.1:{port}"
    srv.stop()


@pytest.fixture(scope="module")
def url(grpc_server: tuple[Server, str]) -> str:
    return grpc_server[1]


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def channel(url: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(url) as ch:
        yield ch


def _latest(test_models: TestModels, name: str) -> int:
    return max(int(p.name) for p in (test_models.repository / name).iterdir() if p.name.isdigit())


def _reference(test_models: TestModels, x: np.ndarray) -> np.ndarray:
    version = _latest(test_models, test_models.image)
    path = test_models.repository / test_models.image / str(version) / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"pixels": x})[0]


def _pixels(x: np.ndarray) -> triton.InferInput:
    inp = triton.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    return inp


def _images(seed: int, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, 1, 28, 28), dtype=np.uint8)


def test_health_and_metadata_answer_like_triton(
    client: triton.InferenceServerClient, test_models: TestModels
):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "neuroserve"
    assert {"classification", "statistics", "model_repository"} <= set(meta.extensions)
    model = client.get_model_metadata(test_models.image)
    assert model.platform == "onnxruntime_onnx"
    assert str(_latest(test_models, test_models.image)) in model.versions
    assert (model.inputs[0].name, model.inputs[0].datatype, list(model.inputs[0].shape)) == (
        "pixels", "UINT8", [-1, 1, 28, 28])
    config = client.get_model_config(test_models.image).config
    assert config.max_batch_size >= 1 and list(config.input[0].dims) == [1, 28, 28]
    assert client.is_model_ready(test_models.image)
    assert not client.is_model_ready("no-such-model")


def test_infer_with_raw_contents_matches_onnxruntime_and_echoes_the_id(
    client: triton.InferenceServerClient, test_models: TestModels
):
    x = _images(1, rows=3)
    result = client.infer(test_models.image, [_pixels(x)], request_id="grpc-7",
                          outputs=[triton.InferRequestedOutput("probabilities")])
    response = result.get_response()
    assert response.id == "grpc-7" and [o.name for o in response.outputs] == ["probabilities"]
    assert response.raw_output_contents  # tensors travel as raw bytes
    np.testing.assert_allclose(result.as_numpy("probabilities"), _reference(test_models, x), **TOL)


def test_typed_contents_and_trailing_metadata(channel: grpc.Channel, test_models: TestModels):
    x = _images(2)
    request = pb.ModelInferRequest(model_name=test_models.image, id="typed")
    tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=x.shape)
    tensor.contents.uint_contents.extend(x.reshape(-1).tolist())
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    response, call = stub.ModelInfer.with_call(request, metadata=(("x-request-id", "trace-42"),))
    i = [o.name for o in response.outputs].index("probabilities")
    got = np.frombuffer(response.raw_output_contents[i], dtype=np.float32).reshape(1, -1)
    np.testing.assert_allclose(got, _reference(test_models, x), **TOL)
    trailers = dict(call.trailing_metadata())
    assert trailers["x-request-id"] == "trace-42"
    assert "queue;dur=" in trailers["server-timing"] and "compute;dur=" in trailers["server-timing"]


def test_200_concurrent_async_infers_each_get_their_own_answer(test_models: TestModels, url: str):
    # One row each: 200 rows always fit the test model's queue (256 rows), however the requests
    # arrive; the row-splitting of larger requests is pinned by the other tests.
    images = [_images(100 + i, rows=1) for i in range(200)]
    want = [_reference(test_models, x) for x in images]

    async def main() -> list[np.ndarray]:
        async with triton_aio.InferenceServerClient(url) as c:
            results = await asyncio.gather(*(c.infer(test_models.image, [_pixels(x)], request_id=str(i))
                                             for i, x in enumerate(images)))
            assert [r.get_response().id for r in results] == [str(i) for i in range(200)]
            return [r.as_numpy("probabilities") for r in results]

    for got, expected in zip(asyncio.run(main()), want, strict=True):
        np.testing.assert_allclose(got, expected, **TOL)


def test_classification_returns_top_k_score_index_label(
    client: triton.InferenceServerClient, test_models: TestModels
):
    x = _images(3, rows=2)
    want = _reference(test_models, x)
    out = triton.InferRequestedOutput("probabilities", class_count=3)
    result = client.infer(test_models.image, [_pixels(x)], outputs=[out]).as_numpy("probabilities")
    assert result.shape == (2, 3)
    for row in range(2):
        entries = [s.decode().split(":", 2) for s in result[row]]
        assert [int(e[1]) for e in entries] == list(np.argsort(-want[row], kind="stable")[:3])
        assert all(e[2] for e in entries)


def test_text_model_takes_bytes_tensors(client: triton.InferenceServerClient, test_models: TestModels):
    texts = triton.InferInput("text", [2], "BYTES")
    texts.set_data_from_numpy(np.array([b"what a great film", b"boring and dull"], dtype=object))
    probs = client.infer(test_models.text, [texts]).as_numpy("probabilities")
    assert probs.shape == (2, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_gzip_compressed_requests_are_accepted(client: triton.InferenceServerClient, test_models: TestModels):
    x = _images(4)
    result = client.infer(test_models.image, [_pixels(x)], compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("probabilities"), _reference(test_models, x), **TOL)


def test_unknown_model_is_not_found(client: triton.InferenceServerClient, test_models: TestModels):
    with pytest.raises(InferenceServerException, match="unknown model") as e:
        client.infer("no-such-model", [_pixels(_images(5))])
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.infer(test_models.image, [_pixels(_images(5))], model_version="99")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_wrong_shape_datatype_and_raw_size_are_invalid_argument(
    client: triton.InferenceServerClient, channel: grpc.Channel, test_models: TestModels
):
    bad_shape = np.zeros((1, 1, 27, 28), dtype=np.uint8)
    with pytest.raises(InferenceServerException, match="shape") as e:
        client.infer(test_models.image, [_pixels(bad_shape)])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    floats = triton.InferInput("pixels", [1, 1, 28, 28], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 1, 28, 28), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="datatype") as e:
        client.infer(test_models.image, [floats])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    request = pb.ModelInferRequest(model_name=test_models.image)
    request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(b"\0" * 783)
    with pytest.raises(grpc.RpcError) as rpc:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 784 bytes, got 783" in rpc.value.details()


def test_stream_answers_every_request_with_its_id(
    client: triton.InferenceServerClient, test_models: TestModels
):
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    images = {f"s{i}": _images(200 + i) for i in range(6)}
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for rid, x in images.items():
            client.async_stream_infer(test_models.image, [_pixels(x)], request_id=rid)
        client.async_stream_infer("no-such-model", [_pixels(images["s0"])], request_id="bad")
        got = [answers.get(timeout=10) for _ in range(len(images) + 1)]
    finally:
        client.stop_stream()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "unknown model" in str(errors[0])
    results = {r.get_response().id: r.as_numpy("probabilities") for r, error in got if error is None}
    assert set(results) == set(images)
    for rid, x in images.items():
        np.testing.assert_allclose(results[rid], _reference(test_models, x), **TOL)


def test_health_service_reports_serving_and_reflection_lists_the_services(channel: grpc.Channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_statistics_and_metrics_count_grpc_inferences(
    client: triton.InferenceServerClient, grpc_server: tuple[Server, str], test_models: TestModels
):
    name = test_models.audio
    before = client.get_inference_statistics(name).model_stats[0]
    width = client.get_model_metadata(name).inputs[0].shape[1]
    for _ in range(3):
        inp = triton.InferInput("waveform", [2, width], "FP32")
        inp.set_data_from_numpy(np.zeros((2, width), dtype=np.float32))
        client.infer(name, [inp])
    after = client.get_inference_statistics(name).model_stats[0]
    assert after.inference_count - before.inference_count == 6
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    text = httpx.get(f"{grpc_server[0].url}/metrics").text
    counted = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("neuroserve_requests_total{") and 'endpoint="grpc_infer"' in line
               and f'model="{name}"' in line and 'outcome="success"' in line]
    assert counted and counted[0] >= 3
    protocols = {endpoint: protocol for endpoint, protocol in re.findall(
        r'^neuroserve_requests_total\{[^}]*endpoint="(\w+)"[^}]*protocol="(\w+)"', text, re.MULTILINE)}
    assert protocols["grpc_infer"] == "grpc" and protocols["v2_infer"] == "http"


def test_a_message_over_the_size_limit_is_resource_exhausted_and_the_server_serves_on(
    test_models: TestModels, tmp_path: Path
):
    port = free_port()
    srv = start_server(test_models.repository, tmp_path / "server.log", "--grpc-port", str(port),
                       "--max-body-bytes", "65536")
    try:
        with triton.InferenceServerClient(f"127.0.0.1:{port}") as c:
            with pytest.raises(InferenceServerException) as e:
                c.infer(test_models.image, [_pixels(_images(8, rows=100))])  # 78,400 bytes of pixels
            assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            x = _images(9, rows=2)
            out = c.infer(test_models.image, [_pixels(x)]).as_numpy("probabilities")
            np.testing.assert_allclose(out, _reference(test_models, x), **TOL)
    finally:
        srv.stop()


def test_a_request_past_its_timeout_is_deadline_exceeded_and_counted(
    client: triton.InferenceServerClient, grpc_server: tuple[Server, str], test_models: TestModels
):
    def shed() -> float:
        text = httpx.get(f"{grpc_server[0].url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("neuroserve_rejections_total{") and 'reason="deadline"' in line
                   and f'model="{test_models.image}"' in line)

    before = shed()
    # Triton's `timeout` parameter, in microseconds: 1 µs has passed before the request is queued.
    with pytest.raises(InferenceServerException, match="deadline") as e:
        client.infer(test_models.image, [_pixels(_images(10))], timeout=1)
    assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert shed() == before + 1
    # The call's own gRPC deadline, as short: the same status, whichever side notices first. gRPC
    # keeps deadlines in milliseconds, so a tiny model may still answer before its timer fires: a
    # call is either answered or DEADLINE_EXCEEDED, and a few tries see the deadline.
    statuses = []
    for _ in range(10):
        try:
            client.infer(test_models.image, [_pixels(_images(11))], client_timeout=1e-6)
            statuses.append("answered")
        except InferenceServerException as err:
            statuses.append(err.status())
            if err.status() == "StatusCode.DEADLINE_EXCEEDED":
                break
    assert statuses[-1] == "StatusCode.DEADLINE_EXCEEDED" and set(statuses) <= {
        "answered", "StatusCode.DEADLINE_EXCEEDED"}, statuses


def test_grpc_port_in_use_fails_the_start(test_models: TestModels, tmp_path: Path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(RuntimeError, match="cannot listen for gRPC"):
            start_server(test_models.repository, tmp_path / "server.log", "--grpc-port", str(port),
                         timeout=60)


def test_every_worker_serves_grpc_on_the_shared_port(test_models: TestModels, tmp_path: Path):
    port = free_port()
    server = start_server(test_models.repository, tmp_path / "server.log", "--workers", "2",
                          "--grpc-port", str(port))
    try:
        x = _images(6)
        want = _reference(test_models, x)
        for _ in range(6):  # new connections, spread over the workers by the kernel
            with triton.InferenceServerClient(f"127.0.0.1:{port}") as c:
                result = c.infer(test_models.image, [_pixels(x)])
                np.testing.assert_allclose(result.as_numpy("probabilities"), want, **TOL)
        # Ready means one worker serves; the other starts its gRPC server a moment later.
        deadline = time.monotonic() + 30
        while server.logs().count("gRPC listening") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.logs().count("gRPC listening") == 2
    finally:
        server.stop()


def test_sigterm_finishes_inflight_grpc_inferences_and_refuses_new_ones(tmp_path: Path):
    repo = tmp_path / "models"
    m.slow_model(repo, width=768, max_batch=1, queue=16)
    port = free_port()
    # The slow graph is slow only on a CPU (a GPU finishes its matmuls before SIGTERM arrives).
    server = start_server(repo, tmp_path / "server.log", "--providers", "cpu", "--grpc-port", str(port))
    n = 4
    wave = np.linspace(-1, 1, 768, dtype=np.float32).reshape(1, 768)

    def waveform() -> triton_aio.InferInput:
        inp = triton_aio.InferInput("waveform", [1, 768], "FP32")
        inp.set_data_from_numpy(wave)
        return inp

    async def scenario() -> tuple[list[object], object]:
        async with triton_aio.InferenceServerClient(f"127.0.0.1:{port}") as c:
            await c.is_server_live()  # connected before the burst
            inflight = [asyncio.create_task(c.infer("slow", [waveform()])) for _ in range(n)]
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as h:
                for _ in range(300):
                    text = (await h.get("/metrics")).text
                    line = next(x for x in text.splitlines() if x.startswith("neuroserve_inflight_requests{"))
                    if float(line.split()[-1]) >= n:
                        break
                    await asyncio.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)  # the drain has begun: the four are still computing
            try:
                refused: object = await c.infer("slow", [waveform()])
            except InferenceServerException as e:
                refused = e
            return await asyncio.gather(*inflight, return_exceptions=True), refused

    try:
        answers, refused = asyncio.run(scenario())
        assert all(not isinstance(a, BaseException) for a in answers), answers
        assert isinstance(refused, InferenceServerException)
        assert refused.status() == "StatusCode.UNAVAILABLE"
        server.process.wait(30)
        assert "drained: no request in flight" in server.logs()
    finally:
        server.stop()
