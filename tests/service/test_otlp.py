"""The span exporter process: its protobuf, decoded with the OTLP messages themselves; the process
itself, fed by a real front-end side and posting to a real receiver; and its end with its
front-end's."""

from __future__ import annotations

import gzip
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from time import perf_counter

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus

from service.observability import otlp, tracing
from tests.service import models as m
from tests.service.servers import start_server


def _decode(body: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return request


def _attrs(kvs: object) -> dict[str, object]:
    out = {}
    for kv in kvs:  # type: ignore[attr-defined]
        kind = kv.value.WhichOneof("value")
        value = getattr(kv.value, kind)
        out[kv.key] = list(_value.string_value for _value in value.values) if kind == "array_value" else value
    return out


def test_a_record_encodes_as_its_span_and_children_in_otlp_protobuf() -> None:
    trace_id, span_id, parent_id = secrets.token_bytes(16), secrets.token_bytes(8), secrets.token_bytes(8)
    link = (secrets.token_bytes(16), secrets.token_bytes(8))
    attributes = {"http.route": "/v2/models/{model}/infer", "http.response.status_code": 503,
                  "big": 2**40, "negative": -3, "ratio": 0.25, "flag": True, "off": False, "one": 1,
                  "list": ["a", "b"], "ü": "ünïcode"}
    record = (trace_id, span_id, parent_id, "vendor=abc", otlp.SPAN_KIND_SERVER,
              "POST /v2/models/{model}/infer", 10.0, 10.5, attributes, "the model failed", [link],
              [("decode", 10.0, 10.1, None), ("compute", 10.2, 10.3, {"batch.size": 4}),
               ("encode", 10.4, 10.39, None)])  # ends before it starts: clamped to its start
    offset = 1_700_000_000 * 10**9
    for _ in range(2):  # the second time from the caches of encoded attributes and names
        request = _decode(otlp.export_request({"service.name": "ns", "process.pid": 42},
                                              ("neuroserve", "1.2"), otlp.spans_of(record, offset)))
    (resource_spans,) = request.resource_spans
    assert _attrs(resource_spans.resource.attributes) == {"service.name": "ns", "process.pid": 42}
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("neuroserve", "1.2")
    root, *kids = scope_spans.spans
    assert (root.trace_id, root.span_id, root.parent_span_id) == (trace_id, span_id, parent_id)
    assert root.trace_state == "vendor=abc" and root.kind == PbSpan.SPAN_KIND_SERVER
    assert root.name == "POST /v2/models/{model}/infer"
    assert root.start_time_unix_nano == offset + 10 * 10**9
    assert root.end_time_unix_nano == offset + 10_500_000_000
    assert _attrs(root.attributes) == attributes
    assert [type(v) for v in _attrs(root.attributes).values()] == [type(v) for v in attributes.values()]
    assert [(li.trace_id, li.span_id) for li in root.links] == [link]
    assert (root.status.code, root.status.message) == (PbStatus.STATUS_CODE_ERROR, "the model failed")
    assert [k.name for k in kids] == ["decode", "compute", "encode"]
    for kid in kids:
        assert (kid.trace_id, kid.parent_span_id, kid.trace_state) == (trace_id, span_id, "vendor=abc")
        assert kid.kind == PbSpan.SPAN_KIND_INTERNAL and len(kid.span_id) == 8
        assert kid.status.code == PbStatus.STATUS_CODE_UNSET and not kid.links
    assert len({k.span_id for k in kids} | {span_id}) == 4
    assert _attrs(kids[1].attributes) == {"batch.size": 4}
    assert kids[2].end_time_unix_nano == kids[2].start_time_unix_nano
    # A root without parent, trace state or status: those fields are absent.
    bare_record = (trace_id, span_id, None, "", otlp.SPAN_KIND_INTERNAL, "batch m", 1.0, 2.0, None, None,
                   None, None)
    bare = _decode(otlp.export_request({}, ("neuroserve", ""), otlp.spans_of(bare_record, 0)))
    (span,) = bare.resource_spans[0].scope_spans[0].spans
    assert span.parent_span_id == b"" and span.trace_state == "" and not span.HasField("status")


class HeaderReceiver:
    """An OTLP/HTTP endpoint that keeps each export's headers and (gunzipped) body."""

    def __init__(self) -> None:
        self.exports: list[tuple[dict[str, str], ExportTraceServiceRequest]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.exports.append((dict(self.headers.items()), _decode(body)))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def header_receiver() -> Iterator[HeaderReceiver]:
    r = HeaderReceiver()
    yield r
    r.close()


def test_exporter_process_sends_what_is_queued_gzipped_with_the_otlp_headers_when_closed(
        header_receiver: HeaderReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-api-key=secret%20one,tenant=a")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # nothing leaves before the close
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "100")
    exporter = tracing.SpanExporter(header_receiver.url, {"service.name": "exp-test"}, "9.9")
    now = perf_counter()
    ids = [(secrets.token_bytes(16), secrets.token_bytes(8)) for _ in range(30)]
    for trace_id, span_id in ids:
        exporter.records.append((trace_id, span_id, None, "", otlp.SPAN_KIND_SERVER, "GET /x", now,
                                 now + 0.001, {"i": 1}, None, None, [("decode", now, now + 0.0005, None)]))
    time.sleep(0.3)  # pushed to the process by now, and held there
    assert header_receiver.exports == []
    exporter.close(timeout_s=10)
    assert exporter.process.returncode == 0
    spans = [s for _, r in header_receiver.exports for s in r.resource_spans[0].scope_spans[0].spans]
    assert len(header_receiver.exports) == 1 + (60 - 1) // 100 and len(spans) == 60
    assert {(s.trace_id, s.span_id) for s in spans if s.kind == PbSpan.SPAN_KIND_SERVER} == set(ids)
    headers, request = header_receiver.exports[0]
    assert headers["x-api-key"] == "secret one" and headers["tenant"] == "a"
    assert headers["Content-Type"] == "application/x-protobuf" and headers["Content-Encoding"] == "gzip"
    assert request.resource_spans[0].scope_spans[0].scope.version == "9.9"
    # Times are this process's perf_counter() on the Unix clock.
    assert abs(spans[0].start_time_unix_nano - time.time_ns()) < 60 * 10**9


def _exporter_children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        kids += [int(c) for c in (task / "children").read_text().split()]
    return [k for k in kids if b"service.observability.otlp" in Path(f"/proc/{k}/cmdline").read_bytes()]


def _alive(pid: int) -> bool:
    try:  # a zombie has no command line
        return b"service.observability.otlp" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_exporter_process_ends_when_its_front_end_is_killed(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    m.image_model(tmp_path / "models")
    srv = start_server(tmp_path / "models", tmp_path / "server.log", "--otlp-endpoint",
                       "http://127.0.0.1:9")  # nothing listens there: no matter
    try:
        body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                            "data": [1] * 784}]}
        assert httpx.post(f"{srv.url}/v2/models/tiny-image/infer", json=body).status_code == 200
        (exporter,) = _exporter_children(srv.process.pid)
        os.kill(srv.process.pid, signal.SIGKILL)
        srv.process.wait()
        deadline = time.monotonic() + 10
        while _alive(exporter):
            assert time.monotonic() < deadline, "the exporter process outlived its front-end"
            time.sleep(0.05)
    finally:
        srv.stop()
