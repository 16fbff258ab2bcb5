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
from collections.abc import Callable, Iterator
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


def test_a_request_record_encodes_its_constants_values_and_children() -> None:
    class Route:
        path = "/v2/models/{model_name}/infer"

    scope = {"method": "POST", "path": "/v2/models/m/infer", "route": Route(), "scheme": "https",
             "http_version": "2", "server": ("10.0.0.1", 8000), "client": ("10.0.0.9", 41234),
             "headers": [(b"user-agent", b"probe/2")], "path_params": {"model_name": "m"}}
    const, values, error_type = tracing.http_span(scope, 503, "m", "3", "rid-1")
    assert tracing.http_span(scope, 200, "m", "3", "rid-2")[0] is const  # one per route and client
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    record = (const.id, trace_id, span_id, None, "", 1.0, 2.0, values, error_type, "unavailable",
              1.1, 1.8, [(1.1, 1.2, 1.5, 4, 3), (1.5, 1.6, 1.7, 2, 1)])
    encoded = otlp.Constants(const.name, const.attributes, list(const.variable))
    request = _decode(otlp.export_request({}, ("neuroserve", ""), otlp.request_spans(record, encoded, 0)))
    root, *kids = request.resource_spans[0].scope_spans[0].spans
    assert (root.trace_id, root.span_id, root.parent_span_id) == (trace_id, span_id, b"")
    assert root.kind == PbSpan.SPAN_KIND_SERVER and root.name == "POST /v2/models/{model_name}/infer"
    assert _attrs(root.attributes) == {
        "http.request.method": "POST", "url.path": "/v2/models/m/infer", "url.scheme": "https",
        "network.protocol.version": "2", "http.route": "/v2/models/{model_name}/infer",
        "server.address": "10.0.0.1", "server.port": 8000, "client.address": "10.0.0.9",
        "user_agent.original": "probe/2", "neuroserve.model": "m", "neuroserve.model.version": "3",
        "http.response.status_code": 503, "client.port": 41234, "neuroserve.request_id": "rid-1",
        "error.type": "503"}
    assert (root.status.code, root.status.message) == (PbStatus.STATUS_CODE_ERROR, "unavailable")
    assert [k.name for k in kids] == ["decode", "queue", "compute", "queue", "compute", "encode"]
    assert all(k.parent_span_id == span_id and k.trace_id == trace_id for k in kids)
    assert [_attrs(k.attributes) for k in kids if k.name == "compute"] == [
        {"batch.size": 4, "batch.requests": 3}, {"batch.size": 2, "batch.requests": 1}]
    assert (kids[0].start_time_unix_nano, kids[0].end_time_unix_nano) == (10**9, 1_100_000_000)
    assert kids[-1].start_time_unix_nano == 1_800_000_000 and kids[-1].end_time_unix_nano == 2 * 10**9
    # No client (a Unix socket), nothing queued: those attributes and children are absent.
    bare_const, bare_values, _ = tracing.http_span({**scope, "client": None}, 200, None, None, "rid-3")
    bare = (bare_const.id, trace_id, span_id, None, "", 1.0, 2.0, bare_values, None, None, 0.0, 0.0, [])
    encoded = otlp.Constants(bare_const.name, bare_const.attributes, list(bare_const.variable))
    (span,) = _decode(otlp.export_request({}, ("neuroserve", ""), otlp.request_spans(bare, encoded, 0))
                      ).resource_spans[0].scope_spans[0].spans
    attributes = _attrs(span.attributes)
    assert "client.port" not in attributes and "client.address" not in attributes
    assert "neuroserve.model" not in attributes and not span.HasField("status")


class HeaderReceiver:
    """An OTLP/HTTP endpoint that keeps each export's headers and (gunzipped) body. While `holding`,
    it reads an export, keeps it in `held` and never answers (until `release` is set), as a hung
    collector would."""

    def __init__(self) -> None:
        self.exports: list[tuple[dict[str, str], ExportTraceServiceRequest]] = []
        self.held: list[ExportTraceServiceRequest] = []
        self.holding = False
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if receiver.holding:
                    receiver.held.append(_decode(body))
                    receiver.release.wait(60)
                    self.close_connection = True
                    return
                receiver.exports.append((dict(self.headers.items()), _decode(body)))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace_ids(self) -> set[bytes]:
        """The trace ids of the server spans exported (and answered) so far."""
        return {s.trace_id for _, r in list(self.exports) for s in _spans(r)
                if s.kind == PbSpan.SPAN_KIND_SERVER}

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _spans(request: ExportTraceServiceRequest) -> list[PbSpan]:
    return [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


def _wait(condition: Callable[[], object], what: str, timeout: float = 10.0) -> float:
    """Poll `condition` until it holds; the seconds it took (fails the test past `timeout`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


def _record(trace_id: bytes) -> tuple[object, ...]:
    now = perf_counter()
    return (trace_id, secrets.token_bytes(8), None, "", otlp.SPAN_KIND_SERVER, "GET /x", now, now + 0.001,
            None, None, None, None)


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
        exporter.record((trace_id, span_id, None, "", otlp.SPAN_KIND_SERVER, "GET /x", now,
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
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    # A child may be reaped between the listing and this look (e.g. the exporter just killed).
    return [k for k in kids if _alive(k)]


def _alive(pid: int) -> bool:
    try:  # a zombie has no command line
        return b"service.observability.otlp" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_request_records_queued_while_packs_leave_keep_their_constants(
        header_receiver: HeaderReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records name constants the packs carry; with the packing thread flushing every 2 ms while
    requests with ever new constants are queued, none arrives without them (none dropped)."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    # Room for every span in the exporter's queue: a slow receiver must not drop any (the SDK's
    # behaviour when its queue is full), or a missing span would say nothing about constants.
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "100000")
    exporter = tracing.SpanExporter(header_receiver.url, {"service.name": "race"}, "1", interval_s=0.002)
    scope = {"method": "POST", "path": "/v2/models/m/infer", "headers": [], "client": ("10.0.0.2", 5)}
    now = perf_counter()
    sent = {}
    for i in range(3000):
        const, values, error_type = tracing.http_span(scope, 200, f"model-{i % 600}", str(i // 600), f"r{i}")
        trace_id = secrets.token_bytes(16)
        exporter.record_request(const.id, (const.id, trace_id, secrets.token_bytes(8), None, "", now,
                                           now + 0.001, values, error_type, None, 0.0, 0.0, []))
        sent[trace_id] = (f"model-{i % 600}", str(i // 600))
        if i % 50 == 0:
            time.sleep(0.001)  # let the packing thread run between records
    exporter.close(timeout_s=20)
    assert exporter.dropped == 0
    spans = [s for _, r in header_receiver.exports for s in _spans(r)]
    got = {s.trace_id: _attrs(s.attributes) for s in spans}
    assert set(got) == set(sent)
    assert all((a["neuroserve.model"], a["neuroserve.model.version"]) == sent[t] for t, a in got.items())


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


def test_an_export_past_otel_bsp_export_timeout_is_abandoned_and_later_exports_arrive(
        header_receiver: HeaderReceiver, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_BSP_EXPORT_TIMEOUT", "300")  # ms
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")  # s: alone, it would hold the exporter 30 s
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    header_receiver.holding = True  # takes the export, never answers
    exporter = tracing.SpanExporter(header_receiver.url, {"service.name": "exp-test"}, "1")
    try:
        first, second, third = (secrets.token_bytes(16) for _ in range(3))
        exporter.record(_record(first))
        _wait(lambda: len(header_receiver.held) == 1, "the first export posted")
        exporter.record(_record(second))
        # The next export comes once the first is given up, on a new connection.
        took = _wait(lambda: len(header_receiver.held) == 2, "the first export abandoned")
        assert 0.1 < took < 5, took
        assert [s.trace_id for r in header_receiver.held for s in _spans(r)] == [first, second]
        # A collector that answers again gets what comes next; the abandoned batches are dropped.
        header_receiver.holding = False
        exporter.record(_record(third))
        _wait(lambda: third in header_receiver.trace_ids(), "the export after the hung ones")
        assert header_receiver.trace_ids() == {third}
    finally:
        exporter.close(timeout_s=10)
    assert exporter.process.returncode == 0 and exporter.restarts == 0
    assert "abandoned after OTEL_BSP_EXPORT_TIMEOUT=300 ms" in capfd.readouterr().err


def test_a_killed_exporter_process_is_restarted_and_shutdown_does_not_restart_it(
        header_receiver: HeaderReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    exporter = tracing.SpanExporter(header_receiver.url, {"service.name": "exp-test"}, "1", check_s=0.05,
                                    restart_min_s=0.2, restart_max_s=5)
    monkeypatch.setattr(tracing, "_exporter", exporter)  # what tracing.shutdown() closes
    try:
        first = exporter.process
        os.kill(first.pid, signal.SIGKILL)
        _wait(lambda: exporter.process is not first, "a new exporter process")
        assert first.returncode == -signal.SIGKILL and exporter.restarts == 1
        assert exporter.process.poll() is None

        # Records pushed before the new process bound its socket may be lost; later ones arrive.
        def one_arrives() -> bool:
            trace_id = secrets.token_bytes(16)
            exporter.record(_record(trace_id))
            time.sleep(0.05)
            return trace_id in header_receiver.trace_ids()

        _wait(one_arrives, "a record after the restart")
        later = {secrets.token_bytes(16) for _ in range(20)}
        for trace_id in later:
            exporter.record(_record(trace_id))
        _wait(lambda: later <= header_receiver.trace_ids(), "every record after the restart")
        # Killed again, then shut down at once: nothing is started after the shutdown.
        os.kill(exporter.process.pid, signal.SIGKILL)
    finally:
        tracing.shutdown(timeout_s=5)
    restarts = exporter.restarts
    assert not exporter._thread.is_alive() and exporter.process.poll() is not None
    time.sleep(10 * exporter.check_s)
    assert exporter.restarts == restarts
    assert not [pid for pid in _exporter_children(os.getpid()) if _alive(pid)]


def test_a_traced_server_restarts_its_killed_exporter_and_no_request_fails_meanwhile(
        header_receiver: HeaderReceiver, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    m.image_model(tmp_path / "models")
    srv = start_server(tmp_path / "models", tmp_path / "server.log", "--otlp-endpoint", header_receiver.url,
                       "--trace-sample-ratio", "1.0", env={"OTEL_BSP_SCHEDULE_DELAY": "50"})
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [1] * 784}]}
    infer = f"{srv.url}/v2/models/tiny-image/infer"

    def traced(client: httpx.Client) -> bytes:
        trace_id = secrets.token_bytes(16)
        r = client.post(infer, json=body, headers={"traceparent": f"00-{trace_id.hex()}-{'ab' * 8}-01"})
        assert r.status_code == 200
        return trace_id

    codes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                codes.append(client.post(infer, json=body).status_code)

    loader = threading.Thread(target=load)
    try:
        with httpx.Client(timeout=10) as client:
            before = traced(client)
            _wait(lambda: before in header_receiver.trace_ids(), "a span before the kill")
            (old,) = _exporter_children(srv.process.pid)
            loader.start()
            os.kill(old, signal.SIGKILL)
            _wait(lambda: [p for p in _exporter_children(srv.process.pid) if p != old and _alive(p)],
                  "the exporter process restarted", timeout=15)
            (new,) = _exporter_children(srv.process.pid)

            def one_arrives() -> bool:  # spans of requests before the new process bound may be lost
                trace_id = traced(client)
                time.sleep(0.1)
                return trace_id in header_receiver.trace_ids()

            _wait(one_arrives, "a span after the restart")
            later = {traced(client) for _ in range(5)}
            _wait(lambda: later <= header_receiver.trace_ids(), "every span after the restart")
            stop.set()
            loader.join(10)
            assert codes and set(codes) == {200}, codes
            metrics = client.get(f"{srv.url}/metrics").text
            assert "neuroserve_trace_exporter_restarts_total 1.0" in metrics
        assert f"the span exporter process {old} exited (signal SIGKILL)" in srv.logs()
        # The restarted process still ends with its front-end.
        os.kill(srv.process.pid, signal.SIGKILL)
        srv.process.wait()
        _wait(lambda: not _alive(new), "the restarted exporter ended with its front-end")
    finally:
        stop.set()
        if loader.is_alive():
            loader.join(10)
        srv.stop()
