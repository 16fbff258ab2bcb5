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

Export is the SDK's BatchSpanProcessor with the OTLP/HTTP protobuf exporter: spans are queued in
memory and sent by a background thread, so a slow or absent collector costs requests nothing (the
queue drops spans when full).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("neuroserve.tracing")

# Checked once per request by every transport: False means tracing costs nothing.
enabled = False
# The trace of the request being served, for the batcher (set by the transports while enabled).
current: ContextVar[RequestTrace | None] = ContextVar("neuroserve_trace", default=None)

_processor: BatchSpanProcessor | None = None
_resource = Resource({})
_scope = InstrumentationScope("neuroserve")
_sampler: _Sampler | None = None
_slow_s = 0.0
# perf_counter() seconds → Unix nanoseconds, as spans want them.
_epoch_offset_ns = 0
_propagator = TraceContextTextMapPropagator()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = Status(StatusCode.UNSET)

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
    links: list[Link] = field(default_factory=list)


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


def setup(otlp_endpoint: str, sample_ratio: float, slow_ms: float, version: str) -> bool:
    """Start exporting from this process (each worker calls it after the fork). Returns whether
    tracing is on; a failure to set up is logged and leaves it off, never stops the service."""
    global enabled, _processor, _resource, _scope, _sampler, _slow_s, _epoch_offset_ns
    if not wanted(otlp_endpoint):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Per worker: its pid, and a service.instance.id of its own (the SDK makes one per call).
        resource = Resource.create({SERVICE_VERSION: version, "process.pid": os.getpid()})
        if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
                "OTEL_RESOURCE_ATTRIBUTES", ""):
            resource = resource.merge(Resource({SERVICE_NAME: "neuroserve"}))
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_endpoint(otlp_endpoint)))
    except Exception:
        log.exception("tracing could not be set up; serving without it")
        return False
    _processor, _resource = processor, resource
    _scope = InstrumentationScope("neuroserve", version)
    _sampler = sampler_from(os.environ.get("OTEL_TRACES_SAMPLER", ""),
                            os.environ.get("OTEL_TRACES_SAMPLER_ARG", ""), sample_ratio)
    _slow_s = slow_ms / 1000
    _epoch_offset_ns = time.time_ns() - time.perf_counter_ns()
    enabled = True
    log.info("tracing on", extra={"endpoint": traces_endpoint(otlp_endpoint) or "from OTEL_* variables",
                                  "sampler": repr(_sampler), "slow_ms": slow_ms})
    return True


def shutdown(timeout_s: float = 3.0) -> None:
    """Stop tracing and send what is queued (bounded: a down collector does not hold the exit)."""
    global enabled, _processor
    enabled = False
    processor, _processor = _processor, None
    if processor is None:
        return

    def flush() -> None:
        try:
            processor.shutdown()
        except Exception:
            log.exception("tracing shutdown failed")

    # The SDK waits up to 30 s for a collector that does not answer; a daemon thread bounded by
    # `timeout_s` keeps that wait off the exit.
    thread = threading.Thread(target=flush, name="otel-shutdown", daemon=True)
    thread.start()
    thread.join(timeout_s)


def _span_id() -> int:
    return random.getrandbits(64) or 1  # 0 is the invalid id


def _trace_id() -> int:
    return random.getrandbits(128) or 1


def _ns(perf: float) -> int:
    return int(perf * 1e9) + _epoch_offset_ns


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
    if not any(k == b"traceparent" for k, _ in headers):
        return RequestTrace(None, start)
    return RequestTrace(_parent(headers, _HEADERS), start)


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
    batch = BatchTrace(start, end, attributes, failed, len(traces))
    for rt, enqueued_at in traces:
        rt.batches.append((enqueued_at, batch))


Describe = Callable[[], tuple[str, dict[str, Any]]]


def finish(rt: RequestTrace, describe: Describe, status_error: bool, end: float | None = None) -> str | None:
    """End a request: export its spans if sampled or slow. `describe()` gives the server span's
    name and attributes, asked for only when it is exported. Returns the trace id (hex) when
    exported, for exemplars. Never raises: tracing must not fail a request."""
    try:
        return _finish(rt, describe, status_error, perf_counter() if end is None else end)
    except Exception:
        log.exception("recording a trace failed")
        return None


def _finish(rt: RequestTrace, describe: Describe, status_error: bool, end: float) -> str | None:
    processor = _processor
    exported = processor is not None and (_sampler.sampled(rt.parent) or (0 < _slow_s <= end - rt.start))
    request_span = None
    if exported:
        name, attributes = describe()
        # Finished spans are built directly: the SDK's tracer would run a sampler, the span
        # processors' start hooks and locks for each, work that buys nothing for spans whose times
        # are all known already.
        parent = rt.parent
        trace_id = parent.trace_id if parent is not None else _trace_id()
        request_span = SpanContext(trace_id, _span_id(), False, _SAMPLED,
                                   parent.trace_state if parent is not None else None)
        spans = []
        if rt.enqueued:
            spans.append(_span("decode", request_span, rt.start, rt.enqueued))
        last_end = 0.0
        for enqueued_at, batch in rt.batches:
            spans.append(_span("queue", request_span, enqueued_at, batch.start))
            spans.append(_span("compute", request_span, batch.start, batch.end, {
                "batch.size": batch.attributes["batch.size"],
                "batch.requests": batch.attributes["batch.requests"]}))
            last_end = max(last_end, batch.end)
        if rt.answered and last_end:
            spans.append(_span("encode", request_span, rt.answered, end))
        if rt.error_type is not None:
            attributes["error.type"] = rt.error_type
        status = Status(StatusCode.ERROR, rt.error_message) if status_error else _OK
        processor.on_end(ReadableSpan(
            name, request_span, parent, _resource, attributes, kind=SpanKind.SERVER, status=status,
            start_time=_ns(rt.start), end_time=_ns(end), instrumentation_scope=_scope))
        for span in spans:
            processor.on_end(span)
    for _, batch in rt.batches:
        if request_span is not None:
            batch.links.append(Link(request_span))
        batch.waiting -= 1
        if batch.waiting == 0 and batch.links and processor is not None:
            processor.on_end(_batch_span(batch))
    return format(request_span.trace_id, "032x") if request_span is not None else None


def _span(name: str, parent: SpanContext, start: float, end: float,
          attributes: dict[str, Any] | None = None) -> ReadableSpan:
    context = SpanContext(parent.trace_id, _span_id(), False, _SAMPLED, parent.trace_state)
    return ReadableSpan(name, context, parent, _resource, attributes, kind=SpanKind.INTERNAL,
                        start_time=_ns(start), end_time=_ns(max(start, end)), instrumentation_scope=_scope)


def _batch_span(batch: BatchTrace) -> ReadableSpan:
    """A trace of its own (a batch has many parents), linked to the request spans it served."""
    context = SpanContext(_trace_id(), _span_id(), False, _SAMPLED)
    status = Status(StatusCode.ERROR, "a request of the batch failed") if batch.failed else _OK
    return ReadableSpan(f"batch {batch.attributes.get('neuroserve.model', '')}".strip(), context, None,
                        _resource, batch.attributes, links=batch.links, kind=SpanKind.INTERNAL,
                        status=status, start_time=_ns(batch.start), end_time=_ns(batch.end),
                        instrumentation_scope=_scope)


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


def http_attributes(scope: dict[str, Any], status: int) -> tuple[str, dict[str, Any]]:
    method = scope.get("method", "GET")
    route_obj = scope.get("route")
    route = http_route(scope.get("path", ""), scope.get("path_params"), getattr(route_obj, "path", None))
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": scope.get("path", ""),
        "url.scheme": scope.get("scheme", "http"),
        "http.response.status_code": status,
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    if route:
        attributes["http.route"] = route
    server = scope.get("server")
    if server:
        attributes["server.address"], attributes["server.port"] = server[0], server[1]
    client = scope.get("client")
    if client:
        attributes["client.address"], attributes["client.port"] = client[0], client[1]
    for key, value in scope.get("headers", ()):
        if key == b"user-agent":
            attributes["user_agent.original"] = value.decode("latin-1")
    if status >= 500:
        attributes["error.type"] = str(status)
    return (f"{method} {route}" if route else method), attributes


def grpc_attributes(service: str, method: str, code: int) -> tuple[str, dict[str, Any]]:
    return f"{service}/{method}", {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
                                   "rpc.grpc.status_code": code}


def grpc_error(code: int) -> bool:
    return code in _GRPC_SERVER_ERRORS
