"""OpenTelemetry traces: one server span per request, with children for decode, queue wait, batch
compute and encode, and one span per batch linked to every request span it served.

Off unless an OTLP endpoint is configured (`--otlp-endpoint` or the standard
`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`). Off, the request path checks the module flag `enabled` and
does nothing else: no span, no context, no clock read.

On, a request records only timestamps while it runs (a small `RequestTrace`); its spans are built at
its end, with the start and end times it recorded. Deciding then, rather than at the start, is what
makes the tail rule possible: a request slower than `--trace-slow-ms` is exported whatever the
sampler said, and a request that is neither sampled nor slow costs no span object at all. A batch is
computed in another thread before its requests have ended, so its span is built by the last of its
traced requests to finish, linked to the spans of those that were exported.

Export runs in a process of its own (`service.observability.otlp`), one per front-end: a finished
request appends one compact record (its span and its children's times, encoded with msgpack at
once) to a queue, and a thread packs the queue and pushes it over a ZeroMQ socket; the exporter
process builds the OTLP protobuf and sends it. Encoding spans is the expensive part of tracing,
and in the serving process it would hold the GIL against the event loop (docs/benchmarks.md,
"Tracing: what OpenTelemetry costs"). A slow or absent collector costs requests nothing: the socket and the
exporter's queue are bounded, and records past them are dropped. An exporter process that dies is
started again by the pushing thread (with a backoff), counted in
`neuroserve_trace_exporter_restarts_total`.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any
from urllib.parse import urlsplit

import msgspec
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.trace import SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.observability.metrics import TRACE_EXPORTER_RESTARTS
from service.observability.otlp import SPAN_KIND_INTERNAL, Config

log = logging.getLogger("neuroserve.tracing")

# Checked once per request by every transport: False means tracing costs nothing.
enabled = False
# The trace of the request being served, for the batcher (set by the transports while enabled).
current: ContextVar[RequestTrace | None] = ContextVar("neuroserve_trace", default=None)

_exporter: SpanExporter | None = None
_sampler: _Sampler | None = None
_slow_s = 0.0
_propagator = TraceContextTextMapPropagator()
_getrandbits = random.getrandbits
_SIGNALS = frozenset(s.value for s in signal.Signals)

# gRPC status codes that mark a server span as an error (OpenTelemetry semantic conventions).
_GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})  # UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
# INTERNAL, UNAVAILABLE, DATA_LOSS


@dataclass(slots=True)
class BatchTrace:
    """One batch as its traced requests saw it; its span is made when the last of them ends."""

    start: float  # perf_counter() when the compute thread took it
    end: float
    attributes: dict[str, Any]
    failed: bool
    waiting: int  # traced requests of the batch that have not ended yet
    rows: int = 0  # its requests' `compute` spans carry these two: batch.size
    requests: int = 0  # batch.requests
    links: list[tuple[bytes, bytes]] = field(default_factory=list)  # (trace id, span id)


@dataclass(slots=True)
class RequestTrace:
    """What a traced request records while it runs: times only, spans come at its end."""

    parent: SpanContext | None  # the caller's, from `traceparent`/`tracestate`
    start: float
    enqueued: float = 0.0  # first hand-over to a batcher: the end of decoding
    answered: float = 0.0  # last batch result back: the start of encoding
    batches: list[tuple[float, BatchTrace]] = field(default_factory=list)  # (enqueued, batch)
    error_type: str | None = None
    error_message: str | None = None

    def error(self, code: str, message: str) -> None:
        self.error_type, self.error_message = code, message


@dataclass(frozen=True, slots=True)
class _Sampler:
    """Head decision, made at the end of the request: the caller's choice when it made one
    (parent-based), else a ratio. `kind` follows OTEL_TRACES_SAMPLER."""

    ratio: float
    parent_based: bool = True
    on: bool = True  # always_on/always_off for roots, when not a ratio

    def sampled(self, parent: SpanContext | None) -> bool:
        if parent is not None and self.parent_based:
            return parent.trace_flags.sampled
        if self.ratio >= 1.0:
            return self.on
        return random.random() < self.ratio


def sampler_from(kind: str, arg: str, ratio: float) -> _Sampler:
    """The sampler OTEL_TRACES_SAMPLER/_ARG name; `ratio` (--trace-sample-ratio) when unset."""
    kind = kind.strip().lower()
    try:
        arg_ratio = min(1.0, max(0.0, float(arg))) if arg.strip() else 1.0
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a number; using 1.0", arg)
        arg_ratio = 1.0
    samplers = {
        "always_on": _Sampler(1.0, parent_based=False),
        "always_off": _Sampler(1.0, parent_based=False, on=False),
        "traceidratio": _Sampler(arg_ratio, parent_based=False),
        "parentbased_always_on": _Sampler(1.0),
        "parentbased_always_off": _Sampler(1.0, on=False),
        "parentbased_traceidratio": _Sampler(arg_ratio),
    }
    if kind and kind not in samplers:
        log.warning("OTEL_TRACES_SAMPLER=%r is not supported here; using parent-based ratio %s", kind, ratio)
    return samplers.get(kind, _Sampler(ratio))


def traces_endpoint(otlp_endpoint: str) -> str | None:
    """The OTLP/HTTP traces URL: `--otlp-endpoint` (a base URL gets `/v1/traces`), else None to let
    the exporter read OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT."""
    if not otlp_endpoint:
        return None
    path = urlsplit(otlp_endpoint).path
    if path.rstrip("/").endswith("/v1/traces"):
        return otlp_endpoint
    return otlp_endpoint.rstrip("/") + "/v1/traces"


def wanted(otlp_endpoint: str) -> bool:
    """Whether tracing is configured: an endpoint given, and the SDK not disabled by environment."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


class SpanExporter:
    """This process's side of its exporter process: a queue of records that a thread packs and
    pushes to the process every `interval_s`. The request path only appends to the queue (a deque:
    safe from any thread, and bounded, the oldest record giving way when the thread falls behind).
    Once a second rather than every 50 ms: each wake-up of the thread and of the exporter process
    has a cost of its own (the GIL handed over, a process woken with cold caches on a busy
    machine): at c=64 the exporter's CPU per request more than halved (docs/benchmarks.md,
    "Tracing"). The spans wait at most that second longer, beside the batch processor's
    OTEL_BSP_SCHEDULE_DELAY (5 s by default).

    The same thread looks after the process: at most every `check_s` it asks whether the process
    is still there (`poll()`, no cost to requests), and when it died (a crash, an OOM kill) it
    starts another, not sooner than `restart_min_s` after the last start. That delay doubles with
    each restart up to `restart_max_s`, and starts over once a process lived `restart_max_s`. While
    there is none, records go where they went when the collector was slow: into the bounded queues,
    and past them they are dropped."""

    def __init__(self, endpoint: str, resource: dict[str, Any], version: str,
                 interval_s: float = 1.0, max_records: int = 65536, check_s: float = 0.5,
                 restart_min_s: float = 2.0, restart_max_s: float = 60.0) -> None:
        import zmq

        # Records are encoded as they are made: bytes are not tracked by Python's cyclic garbage
        # collector, while the tuples and lists of a record waiting here for the next pack were
        # (about 1,000 of them at 5,000 requests a second), enough to set off collections on the
        # event loop (docs/benchmarks.md, "Fewer garbage collections and fewer wake-ups").
        self.records: deque[bytes] = deque(maxlen=max_records)
        self._record_encoder = msgspec.msgpack.Encoder()  # the event loop's: encoders are not shared
        # The constants named by request records, each put here before its record: a deque, as the
        # records, so that the packing thread never misses one a record named (a set swapped or
        # iterated by it while the event loop adds to it would lose an id, or fail).
        self.named: deque[int] = deque(maxlen=max_records)
        self.interval_s = interval_s
        self.dropped = 0
        self.restarts = 0
        self.check_s = check_s
        self.restart_min_s = restart_min_s
        self.restart_max_s = restart_max_s
        self._restart_delay_s = restart_min_s
        self._next_check = time.monotonic() + check_s
        self._directory = Path(tempfile.mkdtemp(prefix="neuroserve-spans-"))
        address = f"ipc://{self._directory}/spans.sock"
        config = Config(endpoint, address, resource, ("neuroserve", version),
                        time.time_ns() - time.perf_counter_ns())
        self._command = [sys.executable, "-m", "service.observability.otlp",
                         msgspec.msgpack.encode(config).hex()]
        # Held while the process is replaced or closed: `close` never races a restart.
        self._lock = threading.Lock()
        self.process = self._spawn()
        self._context = zmq.Context(1)
        self._push = self._context.socket(zmq.PUSH)
        # Records wait for the process to bind (connect queues at once), up to this many messages;
        # past it, a collector too slow to keep up loses records here, never a request its time.
        # A restarted process binds the same address, and the socket reconnects to it by itself.
        self._push.setsockopt(zmq.SNDHWM, 256)
        self._push.connect(address)
        self._again = zmq.Again
        self._noblock = zmq.NOBLOCK
        self._encode = msgspec.msgpack.Encoder().encode
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Its stdin is how it learns that this process is done or gone (the pipe closes).
        process = subprocess.Popen(self._command, stdin=subprocess.PIPE, close_fds=True)
        self._started = time.monotonic()
        return process

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._flush()
            if time.monotonic() >= self._next_check:
                self._look_after_process()
        self._flush()

    def record(self, record: tuple[Any, ...]) -> None:
        """Queue one record (see `service.observability.otlp`); from the event loop's thread."""
        self.records.append(self._record_encoder.encode(record))

    def record_request(self, constants_id: int, record: tuple[Any, ...]) -> None:
        """Queue a request's record, which names the constants `constants_id`."""
        self.named.append(constants_id)
        self.records.append(self._record_encoder.encode(record))

    def _flush(self) -> None:
        records = self.records
        while records:
            batch = [records.popleft() for _ in range(min(len(records), 1024))]
            # The constants named since the last pack: those of every record just taken (each was
            # named before it was queued), perhaps a few of the next pack's. The exporter keeps
            # what it was sent; sent again with every pack that follows a use, a constant is not
            # lost for good with a dropped pack.
            named = self.named
            used = {named.popleft() for _ in range(len(named))}
            known = _constants_by_id
            definitions = {i: (c.name, c.attributes, c.variable) for i in used if (c := known.get(i))}
            # A msgpack array of two: the constants, and the records as they were encoded.
            pack = b"".join((b"\x92", self._encode(definitions), _array_header(len(batch)), *batch))
            try:
                # Packs of records are large (tens of kB): ZeroMQ takes the buffer as it is.
                self._push.send(pack, self._noblock, copy=False)
            except self._again:
                self.dropped += len(batch)

    def _look_after_process(self) -> None:
        """Restart the exporter process if it died, within the backoff; never after `close`."""
        now = time.monotonic()
        self._next_check = now + self.check_s
        status = self.process.poll()
        if status is None:
            return
        lived_s = now - self._started
        if lived_s >= self.restart_max_s:  # it had been fine for a while: restart at once
            self._restart_delay_s = self.restart_min_s
        if now < self._started + self._restart_delay_s:
            return
        with self._lock:
            if self._stop.is_set():
                return
            old = self.process
            if old.stdin is not None:
                old.stdin.close()
            try:
                self.process = self._spawn()
            except Exception:
                log.exception("the span exporter process could not be restarted")
                self._started = now
                self._restart_delay_s = min(self._restart_delay_s * 2, self.restart_max_s)
                return
            self.restarts += 1
        self._restart_delay_s = min(self._restart_delay_s * 2, self.restart_max_s)
        TRACE_EXPORTER_RESTARTS.inc()
        how = (f"signal {signal.Signals(-status).name}" if status < 0 and -status in _SIGNALS
               else f"status {status}")
        log.warning("the span exporter process %d exited (%s) after %.1f s; restarted it as %d",
                    old.pid, how, lived_s, self.process.pid,
                    extra={"exit_status": status, "restarts": self.restarts,
                           "next_restart_delay_s": self._restart_delay_s})

    def close(self, timeout_s: float) -> None:
        """Send what is queued and let the process export it, waiting at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._lock:  # no restart from here on
            self._stop.set()
        self._thread.join(timeout_s)
        self._push.close(linger=max(0, int((deadline - time.monotonic()) * 1000)))
        self._context.term()
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self._directory, ignore_errors=True)
        if self.dropped:
            log.warning("%d span records dropped: the exporter process did not keep up", self.dropped)


def _array_header(n: int) -> bytes:
    """The msgpack header of an array of `n` items."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def setup(otlp_endpoint: str, sample_ratio: float, slow_ms: float, version: str) -> bool:
    """Start exporting from this process (each worker calls it after the fork). Returns whether
    tracing is on; a failure to set up is logged and leaves it off, never stops the service."""
    global enabled, _exporter, _sampler, _slow_s
    if not wanted(otlp_endpoint):
        return False
    endpoint = traces_endpoint(otlp_endpoint) or _endpoint_from_environment()
    try:
        # Per worker: its pid, and a service.instance.id of its own (the SDK makes one per call).
        resource = Resource.create({SERVICE_VERSION: version, "process.pid": os.getpid()})
        if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
                "OTEL_RESOURCE_ATTRIBUTES", ""):
            resource = resource.merge(Resource({SERVICE_NAME: "neuroserve"}))
        exporter = SpanExporter(endpoint, dict(resource.attributes), version)
    except Exception:
        log.exception("tracing could not be set up; serving without it")
        return False
    _exporter = exporter
    _sampler = sampler_from(os.environ.get("OTEL_TRACES_SAMPLER", ""),
                            os.environ.get("OTEL_TRACES_SAMPLER_ARG", ""), sample_ratio)
    _slow_s = slow_ms / 1000
    enabled = True
    log.info("tracing on", extra={"endpoint": endpoint, "sampler": repr(_sampler), "slow_ms": slow_ms})
    return True


def _endpoint_from_environment() -> str:
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as it is, else OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces
    (the SDK's reading)."""
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"


def shutdown(timeout_s: float = 3.0) -> None:
    """Stop tracing and send what is queued (bounded: a down collector does not hold the exit)."""
    global enabled, _exporter
    enabled = False
    exporter, _exporter = _exporter, None
    if exporter is None:
        return
    try:
        exporter.close(timeout_s)
    except Exception:
        log.exception("tracing shutdown failed")


# -- what the transports call -----------------------------------------------------------------------


class _HeaderGetter(Getter[list[tuple[bytes, bytes]]]):
    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.encode()
        values = [v.decode("latin-1") for k, v in carrier if k == name]
        return values or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


class _MetadataGetter(Getter[Any]):
    def get(self, carrier: Any, key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [k for k, _ in carrier]


_HEADERS = _HeaderGetter()
_METADATA = _MetadataGetter()


def _parent(carrier: Any, getter: Getter[Any]) -> SpanContext | None:
    """The caller's span context from W3C `traceparent`/`tracestate`; None when absent or invalid
    (a malformed header starts a new trace, it never fails the request)."""
    try:
        context = _propagator.extract(carrier, getter=getter)
    except Exception:
        return None
    parent = trace.get_current_span(context).get_span_context()
    return parent if parent.is_valid else None


def begin_http(headers: list[tuple[bytes, bytes]], start: float) -> RequestTrace:
    # Most requests carry no trace context: look before paying for the propagator.
    for key, _ in headers:
        if key == b"traceparent":
            return RequestTrace(_parent(headers, _HEADERS), start)
    return RequestTrace(None, start)


def begin_grpc(metadata: Any, start: float) -> RequestTrace:
    metadata = metadata or ()
    if not any(k == "traceparent" for k, _ in metadata):
        return RequestTrace(None, start)
    return RequestTrace(_parent(metadata, _METADATA), start)


def enqueued(rt: RequestTrace, now: float) -> None:
    if not rt.enqueued:
        rt.enqueued = now


def batch_computed(traces: list[tuple[RequestTrace, float]], start: float, end: float, failed: bool,
                   attributes: dict[str, Any]) -> None:
    """Called by a batcher for a computed batch with the (trace, enqueued) of its traced requests."""
    batch = BatchTrace(start, end, attributes, failed, len(traces), attributes["batch.size"],
                       attributes["batch.requests"])
    for rt, enqueued_at in traces:
        rt.batches.append((enqueued_at, batch))


@dataclass(frozen=True, slots=True)
class SpanConstants:
    """What a request span shares with every other span of its route, model and client: sent to
    the exporter process once per pack of records (by `id`), not with every record."""

    id: int
    name: str
    attributes: dict[str, Any]
    variable: tuple[str, ...]  # the names of the values each record carries, in order


# The constants of request spans by what fixes them (method, route, model, client...), and by id
# for the packing thread. Paths name models: a few hundred keys at most, unless probed.
_constants: dict[tuple[Any, ...], SpanConstants] = {}
_constants_by_id: dict[int, SpanConstants] = {}
_MAX_CONSTANTS = 4096


def constants(key: tuple[Any, ...], build: Callable[[], tuple[str, dict[str, Any], tuple[str, ...]]]
              ) -> SpanConstants:
    """The constants for `key`, made by `build()` (name, attributes, variable names) the first time."""
    found = _constants.get(key)
    if found is not None:
        return found
    if len(_constants) >= _MAX_CONSTANTS:
        _constants.clear()
        # Keep the newest ids a while: records still queued may name them.
        for stale in sorted(_constants_by_id)[:-_MAX_CONSTANTS]:
            del _constants_by_id[stale]
    name, attributes, variable = build()
    made = SpanConstants(_next_constants_id(), name, attributes, variable)
    _constants[key] = _constants_by_id[made.id] = made
    return made


_last_constants_id = 0


def _next_constants_id() -> int:
    global _last_constants_id
    _last_constants_id += 1
    return _last_constants_id


# What a transport's `describe()` gives for an exported request span: its constants, the values of
# their `variable` names, and the span's error.type when the request did not set one.
Described = tuple[SpanConstants, tuple[Any, ...], str | None]
Describe = Callable[[], Described]


def finish(rt: RequestTrace, describe: Describe, status_error: bool, end: float | None = None) -> str | None:
    """End a request: export its spans if sampled or slow. `describe()` gives the server span's
    constants and values, asked for only when it is exported. Returns the trace id (hex) when
    exported, for exemplars. Never raises: tracing must not fail a request."""
    try:
        return _finish(rt, describe, status_error, perf_counter() if end is None else end)
    except Exception:
        log.exception("recording a trace failed")
        return None


def _finish(rt: RequestTrace, describe: Describe, status_error: bool, end: float) -> str | None:
    exporter = _exporter
    exported = exporter is not None and (_sampler.sampled(rt.parent) or (0 < _slow_s <= end - rt.start))
    span = None
    if exported:
        const, values, error_type = describe()
        # One record for the request span and its children, times as recorded: the exporter
        # process makes the spans (and the children's ids) from it.
        parent = rt.parent
        if parent is None:
            ids = _getrandbits(192).to_bytes(24, "big")
            span = (ids[:16], ids[16:])
            parent_id, trace_state = None, ""
        else:
            span = (parent.trace_id.to_bytes(16, "big"), _getrandbits(64).to_bytes(8, "big"))
            parent_id = parent.span_id.to_bytes(8, "big")
            trace_state = parent.trace_state.to_header() if parent.trace_state else ""
        error = (rt.error_message or "") if status_error else None
        exporter.record_request(const.id, (
            const.id, span[0], span[1], parent_id, trace_state, rt.start, end, values,
            rt.error_type or error_type, error, rt.enqueued, rt.answered,
            [(enqueued_at, b.start, b.end, b.rows, b.requests) for enqueued_at, b in rt.batches]))
    for _, batch in rt.batches:
        if span is not None:
            batch.links.append(span)
        batch.waiting -= 1
        if batch.waiting == 0 and batch.links and exporter is not None:
            exporter.record(_batch_record(batch))
    return span[0].hex() if span is not None else None


def _batch_record(batch: BatchTrace) -> tuple[Any, ...]:
    """A trace of its own (a batch has many parents), linked to the request spans it served."""
    ids = _getrandbits(192).to_bytes(24, "big")
    return (ids[:16], ids[16:], None, "", SPAN_KIND_INTERNAL,
            f"batch {batch.attributes.get('neuroserve.model', '')}".strip(), batch.start, batch.end,
            batch.attributes, "a request of the batch failed" if batch.failed else None, batch.links, None)


# -- span names and attributes (OpenTelemetry semantic conventions) ----------------------------------


def http_route(path: str, params: dict[str, str] | None, route: str | None) -> str | None:
    """The route template: the router's, or the path with its parameters named (the fast path
    matches without the router)."""
    if route:
        return route
    if not params:
        return None
    names = {v: k for k, v in params.items() if k != "task"}
    return "/".join(f"{{{names[s]}}}" if s in names else s for s in path.split("/"))


_HTTP_VARIABLE = ("http.response.status_code", "client.port", "neuroserve.request_id")


def http_span(scope: dict[str, Any], status: int, model: str | None, version: str | None,
              request_id: str) -> Described:
    """An HTTP request span (semantic conventions for HTTP servers, and the model's attributes)."""
    client = scope.get("client")
    user_agent = None
    for name, value in scope.get("headers", ()):
        if name == b"user-agent":
            user_agent = value
    route = scope.get("route")
    key = ("http", scope.get("method", "GET"), scope.get("path", ""), getattr(route, "path", None),
           scope.get("scheme", "http"), scope.get("http_version", "1.1"), scope.get("server"),
           client[0] if client else None, user_agent, model, version)
    const = constants(key, lambda: _http_constants(scope, *key[1:]))
    return (const, (status, client[1] if client else None, request_id),
            str(status) if status >= 500 else None)


def _http_constants(scope: dict[str, Any], method: str, path: str, route_path: str | None, scheme: str,
                    version: str, server: tuple[str, int] | None, client_address: str | None,
                    user_agent: bytes | None, model: str | None, model_version: str | None
                    ) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    route = http_route(path, scope.get("path_params"), route_path)
    attributes: dict[str, Any] = {"http.request.method": method, "url.path": path, "url.scheme": scheme,
                                  "network.protocol.version": version}
    if route:
        attributes["http.route"] = route
    if server:
        attributes["server.address"], attributes["server.port"] = server[0], server[1]
    if client_address is not None:
        attributes["client.address"] = client_address
    if user_agent is not None:
        attributes["user_agent.original"] = user_agent.decode("latin-1")
    if model is not None:
        attributes["neuroserve.model"] = model
    if model_version is not None:
        attributes["neuroserve.model.version"] = model_version
    return (f"{method} {route}" if route else method), attributes, _HTTP_VARIABLE


_GRPC_VARIABLE = ("rpc.grpc.status_code", "neuroserve.request_id")


def grpc_span(service: str, method: str, code: int, model: str | None, version: str | None,
              request_id: str) -> Described:
    """A gRPC request span (semantic conventions for RPC servers, and the model's attributes)."""
    const = constants(("grpc", service, method, model, version),
                      lambda: _grpc_constants(service, method, model, version))
    return const, (code, request_id), None


def _grpc_constants(service: str, method: str, model: str | None, version: str | None
                    ) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    attributes: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    if model is not None:
        attributes["neuroserve.model"] = model
    if version is not None:
        attributes["neuroserve.model.version"] = version
    return f"{service}/{method}", attributes, _GRPC_VARIABLE


def grpc_error(code: int) -> bool:
    return code in _GRPC_SERVER_ERRORS
