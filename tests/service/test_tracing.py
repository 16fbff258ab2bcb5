"""OpenTelemetry traces: real servers export with the SDK's OTLP/HTTP exporter to a real receiver in
this process, which decodes the protobuf export requests; the span tree, links and attributes of
REST, gRPC and a batched burst are checked as a collector would see them."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus

from service.observability.metrics import EXEMPLAR_INTERVAL_S
from tests.service import models as m
from tests.service.servers import Server, free_port, start_server

# Spans leave the server every 50 ms instead of the SDK's 5 s, so the tests need not wait.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
MODEL = "tiny-image"
TEXT_MODEL = "tiny-text"


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    trace_state: str
    kind: int
    start: int
    end: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id)
    status: int
    resource: dict[str, Any]


class Receiver:
    """An OTLP/HTTP traces endpoint: decodes each export request and keeps its spans."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                data = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    span = Span(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                s.trace_state, s.kind, s.start_time_unix_nano, s.end_time_unix_nano,
                                {a.key: _value(a.value) for a in s.attributes},
                                [(li.trace_id.hex(), li.span_id.hex()) for li in s.links],
                                s.status.code, resource)
                    with self.lock:
                        self.spans.append(span)

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[Span]:
        """All spans once `predicate(spans)` holds (fails the test after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans not as expected after {timeout}s: {[s.name for s in spans]}")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def pixels_body(rows: int = 1) -> dict[str, Any]:
    return {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [rows, 1, 28, 28],
                        "data": [7] * (rows * 784)}]}


def children(spans: list[Span], parent: Span) -> dict[str, Span]:
    return {s.name: s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id}


def request_span(spans: list[Span], trace_id: str) -> Span | None:
    return next((s for s in spans if s.trace_id == trace_id and s.kind == PbSpan.SPAN_KIND_SERVER), None)


def linked_batch(spans: list[Span], root: Span | None) -> Span | None:
    """The batch span linked to `root`. It is recorded once the batch's last request has ended,
    so it may reach the receiver in a later export than the request span."""
    if root is None:
        return None
    return next((s for s in spans if (root.trace_id, root.span_id) in s.links), None)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("traced-models")
    # A long queue delay, so that concurrent requests meet in batches.
    m.image_model(repo, max_batch=8, delay_ms=20.0)
    m.text_model(repo)
    return repo


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def traced(repository: Path, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Server, str]]:
    grpc_port = free_port()
    srv = start_server(repository, tmp_path_factory.mktemp("traced") / "server.log",
                       "--otlp-endpoint", receiver.url, "--trace-sample-ratio", "1.0",
                       "--grpc-port", str(grpc_port), env={**FAST_EXPORT, "OTEL_SERVICE_NAME": "ns-test"})
    yield srv, f"127.0.0.1:{grpc_port}"
    srv.stop()


def test_rest_request_span_continues_the_callers_trace_with_decode_queue_compute_encode(
        traced: tuple[Server, str], receiver: Receiver) -> None:
    server, _ = traced
    header, trace_id, caller_span = traceparent()
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=pixels_body(),
                   headers={"traceparent": header, "tracestate": "vendor=abc", "user-agent": "probe/1"})
    assert r.status_code == 200
    spans = receiver.wait_for(lambda s: linked_batch(s, request_span(s, trace_id)) is not None
                              and len(children(s, request_span(s, trace_id))) == 4)
    root = request_span(spans, trace_id)
    assert root.parent_span_id == caller_span
    assert root.trace_state == "vendor=abc"
    assert root.name == "POST /v2/models/{model}/infer"
    assert root.resource["service.name"] == "ns-test"
    a = root.attributes
    assert a["http.request.method"] == "POST" and a["http.route"] == "/v2/models/{model}/infer"
    assert a["url.path"] == f"/v2/models/{MODEL}/infer" and a["http.response.status_code"] == 200
    assert a["user_agent.original"] == "probe/1" and a["neuroserve.model"] == MODEL
    assert a["neuroserve.request_id"] == r.headers["x-request-id"]
    parts = children(spans, root)
    assert set(parts) == {"decode", "queue", "compute", "encode"}
    assert parts["compute"].attributes["batch.size"] >= 1
    order = [parts[n] for n in ("decode", "queue", "compute", "encode")]
    for before, after in itertools.pairwise(order):
        assert before.end <= after.start + 1_000  # ns: consecutive phases, no overlap
    assert all(root.start <= s.start and s.end <= root.end for s in order)
    batch = linked_batch(spans, root)
    assert batch.name == f"batch {MODEL}" and batch.trace_id != root.trace_id
    assert batch.attributes["neuroserve.model"] == MODEL and batch.attributes["batch.size"] >= 1


def test_burst_of_32_traced_requests_links_each_to_one_batch_whose_sizes_sum_to_32(
        traced: tuple[Server, str], receiver: Receiver) -> None:
    server, _ = traced
    callers = [traceparent() for _ in range(32)]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                     limits=httpx.Limits(max_connections=32)) as client:
            answers = await asyncio.gather(*(
                client.post(f"/v2/models/{MODEL}/infer", json=pixels_body(),
                            headers={"traceparent": header}) for header, _, _ in callers))
        return [a.status_code for a in answers]

    assert asyncio.run(burst()) == [200] * 32
    ids = {trace_id for _, trace_id, _ in callers}

    def complete(spans: list[Span]) -> bool:
        roots = {(s.trace_id, s.span_id) for s in spans
                 if s.trace_id in ids and s.kind == PbSpan.SPAN_KIND_SERVER}
        linked = {link for s in spans if s.name.startswith("batch ") for link in s.links}
        return len(roots) == 32 and roots <= linked

    spans = receiver.wait_for(complete)
    roots = {s.trace_id: s for s in spans if s.trace_id in ids and s.kind == PbSpan.SPAN_KIND_SERVER}
    assert {s.parent_span_id for s in roots.values()} == {span for _, _, span in callers}
    wanted = {(s.trace_id, s.span_id) for s in roots.values()}
    batches = [s for s in spans if s.name.startswith("batch ") and wanted & set(s.links)]
    for link in wanted:  # each request span linked from exactly one batch span
        assert sum(link in b.links for b in batches) == 1
    assert sum(b.attributes["batch.size"] for b in batches) == 32
    assert all(b.attributes["batch.requests"] == len(b.links) for b in batches)
    assert len(batches) < 32  # concurrent requests shared batches


def test_grpc_infer_continues_the_callers_trace_with_rpc_attributes(
        traced: tuple[Server, str], receiver: Receiver) -> None:
    _, url = traced
    header, trace_id, caller_span = traceparent()
    with triton.InferenceServerClient(url) as client:
        inp = triton.InferInput("pixels", [2, 1, 28, 28], "UINT8")
        inp.set_data_from_numpy(np.full((2, 1, 28, 28), 3, dtype=np.uint8))
        client.infer(MODEL, [inp], headers={"traceparent": header, "tracestate": "k=v"})
        missing, missing_trace, _ = traceparent()
        with pytest.raises(Exception, match=r"unknown|not found"):
            client.infer("no-such-model", [inp], headers={"traceparent": missing})
    spans = receiver.wait_for(lambda s: request_span(s, trace_id) is not None
                              and request_span(s, missing_trace) is not None
                              and linked_batch(s, request_span(s, trace_id)) is not None
                              and len(children(s, request_span(s, trace_id))) == 4)
    root = request_span(spans, trace_id)
    assert root.name == "inference.GRPCInferenceService/ModelInfer"
    assert root.parent_span_id == caller_span and root.trace_state == "k=v"
    a = root.attributes
    assert (a["rpc.system"], a["rpc.service"], a["rpc.method"], a["rpc.grpc.status_code"]) == (
        "grpc", "inference.GRPCInferenceService", "ModelInfer", 0)
    assert children(spans, root)["compute"].attributes["batch.size"] >= 2
    batch = linked_batch(spans, root)
    assert batch.attributes["batch.size"] >= 2
    # NOT_FOUND is the caller's error, not the server's: recorded, but the span is not an error.
    failed = request_span(spans, missing_trace)
    assert failed.attributes["rpc.grpc.status_code"] == 5
    assert failed.attributes["error.type"] == "model_not_found"
    assert failed.status != PbStatus.STATUS_CODE_ERROR


def test_unsampled_caller_and_bad_traceparent_never_fail_a_request(
        traced: tuple[Server, str], receiver: Receiver) -> None:
    server, _ = traced
    unsampled, unsampled_trace, _ = traceparent(sampled=False)
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=pixels_body(),
                   headers={"traceparent": unsampled})
    assert r.status_code == 200
    for bad in ("00-zz-yy-01", "ff-" + "0" * 32 + "-" + "0" * 16 + "-01", "x" * 5000,
                traceparent()[0] + "-extra", "00-" + "0" * 32 + "-" + "1" * 16 + "-01"):
        r = httpx.post(f"{server.url}/v1/text/{TEXT_MODEL}", json={"text": "fine"},
                       headers={"traceparent": bad, "tracestate": "=,=="})
        assert r.status_code == 200, r.text
    marker, marker_trace, _ = traceparent()
    httpx.post(f"{server.url}/v1/text/{TEXT_MODEL}", json={"text": "after"}, headers={"traceparent": marker})
    spans = receiver.wait_for(lambda s: linked_batch(s, request_span(s, marker_trace)) is not None)
    assert request_span(spans, unsampled_trace) is None  # the caller chose not to sample
    text = request_span(spans, marker_trace)
    assert text.attributes["http.route"] == "/v1/text/{model}"
    batch = linked_batch(spans, text)
    assert batch.attributes["batch.padding_ratio"] >= 0.0


def test_request_duration_exemplar_carries_the_trace_id(traced: tuple[Server, str]) -> None:
    server, _ = traced
    time.sleep(EXEMPLAR_INTERVAL_S)  # earlier requests' exemplars are due for replacement
    header, trace_id, _ = traceparent()
    httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=pixels_body(), headers={"traceparent": header})
    body = httpx.get(f"{server.url}/metrics", headers={"accept": "application/openmetrics-text"}).text
    assert f'# {{trace_id="{trace_id}"}}' in body
    plain = httpx.get(f"{server.url}/metrics").text
    assert "neuroserve_request_duration_seconds_bucket" in plain and "trace_id" not in plain


def test_slow_requests_are_exported_even_when_the_ratio_samples_none(
        repository: Path, receiver: Receiver, tmp_path: Path) -> None:
    # Every request is slower than 0.001 ms: the tail rule exports all, ratio 0 and an unsampled
    # caller notwithstanding.
    srv = start_server(repository, tmp_path / "server.log", "--otlp-endpoint", receiver.url,
                       "--trace-sample-ratio", "0", "--trace-slow-ms", "0.001", env=FAST_EXPORT)
    try:
        header, trace_id, _ = traceparent(sampled=False)
        assert httpx.post(f"{srv.url}/v2/models/{MODEL}/infer", json=pixels_body(),
                          headers={"traceparent": header}).status_code == 200
        spans = receiver.wait_for(lambda s: request_span(s, trace_id) is not None)
        assert len(children(spans, request_span(spans, trace_id))) == 4
    finally:
        srv.stop()


def _rate(url: str, n: int = 300, concurrency: int = 8) -> tuple[float, list[int]]:
    async def run() -> tuple[float, list[int]]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            codes: list[int] = []

            async def one() -> None:
                for _ in range(n // concurrency):
                    r = await client.post(f"/v2/models/{MODEL}/infer", json=pixels_body(),
                                          headers={"traceparent": traceparent()[0]})
                    codes.append(r.status_code)

            t = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(concurrency)))
            return len(codes) / (time.perf_counter() - t), codes
    return asyncio.run(run())


def test_a_down_collector_neither_slows_nor_fails_requests(
        repository: Path, traced: tuple[Server, str], tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    srv = start_server(repository, tmp_path / "server.log", "--otlp-endpoint", closed, env=FAST_EXPORT)
    try:
        _rate(srv.url, 40)  # warm both
        _rate(traced[0].url, 40)
        down, down_codes = _rate(srv.url)
        up, up_codes = _rate(traced[0].url)
        assert down_codes == [200] * len(down_codes) and up_codes == [200] * len(up_codes)
        # Export is off the request path: a refused connection is the exporter thread's problem.
        assert down >= 0.7 * up, (down, up)
        started = time.monotonic()
    finally:
        srv.stop()
    assert srv.process.returncode in (0, -15)  # -15: uvicorn re-raises SIGTERM once drained
    assert time.monotonic() - started < 10  # spans the collector never took do not hold the exit


def test_each_worker_process_exports_its_own_spans(
        repository: Path, receiver: Receiver, tmp_path: Path) -> None:
    srv = start_server(repository, tmp_path / "server.log", "--workers", "2", "--otlp-endpoint", receiver.url,
                       env=FAST_EXPORT)
    try:
        callers = [traceparent() for _ in range(16)]
        for header, _, _ in callers:  # new connections: the kernel spreads them over both workers
            with httpx.Client(base_url=srv.url) as client:
                assert client.post(f"/v2/models/{MODEL}/infer", json=pixels_body(),
                                   headers={"traceparent": header}).status_code == 200
        ids = {trace_id for _, trace_id, _ in callers}
        spans = receiver.wait_for(
            lambda s: ids <= {x.trace_id for x in s if x.kind == PbSpan.SPAN_KIND_SERVER})
        pids = {s.resource.get("process.pid") for s in spans if s.trace_id in ids}
        assert len(pids) == 2, pids  # both workers traced, each with its own exporter
        # Exemplars are a one-worker feature; with two the exposition still answers, without them.
        body = httpx.get(f"{srv.url}/metrics", headers={"accept": "application/openmetrics-text"}).text
        assert "neuroserve_request_duration_seconds_bucket" in body
    finally:
        srv.stop()
