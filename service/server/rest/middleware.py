"""One pure-ASGI middleware for what every request needs: request id, body limit, Server-Timing,
request metrics and the access log line. (Pure ASGI rather than BaseHTTPMiddleware: no extra task
or body buffering per request.)
"""

from __future__ import annotations

import itertools
import logging
import secrets
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import orjson
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import audit
from service.auth.gate import Gate, key_of, priority_ceiling
from service.errors import PayloadTooLarge, ServiceError
from service.observability import metrics, tracing
from service.observability.logging import request_id
from service.observability.metrics import ModelMetrics
from service.server.state import ServiceState

access_log = logging.getLogger("neuroserve.access")
log = logging.getLogger("neuroserve.http")
_QUIET_PATHS = ("/metrics", "/v2/health/live", "/v2/health/ready")
CLIENT_CLOSED_REQUEST = 499


@dataclass(slots=True)
class RequestContext:
    """Per-request facts the route learns and the middleware reports."""

    request_id: str
    start: float
    endpoint: str | None = None  # metric label (v2_infer|image|text|audio) for inference routes
    model: str = metrics.UNKNOWN_MODEL
    model_metrics: ModelMetrics | None = None
    admitted: bool = False
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_rows: int = 0
    trace: tracing.RequestTrace | None = None  # only while tracing is on
    caller: str | None = None  # the API key's name, when the request came with one
    rows: int = 0  # rows (inputs) the request asked to compute, for the key's row quota

    def timed(self, queue_s: float, compute_s: float, batch_rows: int) -> None:
        """Fold in one batch result (task requests may span several batches)."""
        self.queue_s = max(self.queue_s, queue_s)
        self.compute_s = max(self.compute_s, compute_s)
        self.batch_rows = max(self.batch_rows, batch_rows)


def context(scope: Scope) -> RequestContext:
    return scope["neuroserve"]


# Generated ids: a random per-process prefix and a counter — unique, and no syscall per request.
_ID_PREFIX = secrets.token_hex(4)
_id_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


def valid_request_id(value: bytes) -> bool:
    return 0 < len(value) <= 128 and all(0x21 <= c <= 0x7E for c in value)


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state
        self.max_body = state.settings.max_body_bytes
        self.access_log = state.settings.access_log
        self.gate = Gate.of(state)
        from service.server import http_protocol  # imports this module
        from service.server.rest.shedding import refuser

        http_protocol.head_refusal = refuser(state, self.gate)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid_header = b""
        length = -1
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                rid_header = value
            elif key == b"content-length":
                length = int(value) if value.isdigit() else -1
            elif key == b"transfer-encoding":
                length = max(length, 1)  # a body of unknown length
        rid = rid_header.decode() if valid_request_id(rid_header) else new_request_id()
        ctx = RequestContext(rid, perf_counter())
        scope["neuroserve"] = ctx
        token = request_id.set(rid)
        trace_token = None
        if tracing.enabled and scope["path"] not in _QUIET_PATHS:
            ctx.trace = tracing.begin_http(scope["headers"], ctx.start)
            trace_token = tracing.current.set(ctx.trace)
        status = 500
        started = False
        body_read = False
        extra_headers: list[tuple[bytes, bytes]] = []

        async def send_with_headers(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", rid.encode()))
                headers.append((b"server-timing", server_timing(ctx).encode()))
                headers.extend(extra_headers)
                if self.state.draining or (length > 0 and not body_read):
                    # Draining: answer, then close, so the client's next request goes elsewhere.
                    # A body left unread (refused from its head or first bytes): close rather
                    # than read the rest of it only to throw it away.
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
            await send(message)

        received = 0
        max_body = self.max_body

        async def receive_limited() -> Message:
            nonlocal received, body_read
            message = await receive()
            if message["type"] == "http.request":
                body_read = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > max_body:
                    raise PayloadTooLarge(f"request body exceeds {max_body} bytes")
            return message

        endpoint_scope = "open"
        priority_token = None
        try:
            try:
                # From the head alone, before a byte of the body is read.
                endpoint_scope, caller = self.gate.check_http(scope)
            except ServiceError as exc:
                ctx.caller = key_of(exc)
                close = length > 0  # an unread body would follow on this connection
                await _send_json(send_with_headers, exc.status, {"error": exc.message, "code": exc.code},
                                 exc.headers, close=close)
                return
            ctx.caller = caller.name
            if caller.priority:
                priority_token = priority_ceiling.set(caller.priority)
            extra_headers.extend((k.lower().encode(), v.encode()) for k, v in caller.headers.items())
            if length > max_body:
                # Refuse before reading a byte of the body.
                await _send_json(send_with_headers, 413, {
                    "error": f"request body of {length} bytes exceeds the limit of {max_body} bytes",
                    "code": PayloadTooLarge.code})
                metrics.reject(metrics.UNKNOWN_MODEL, "too_large")
                return
            try:
                await self.app(scope, receive_limited, send_with_headers)
            except ClientDisconnect:
                # The client went away before its request was read: there is nobody to answer and
                # the server did nothing wrong. Counted as 499, the code nginx logs for it.
                status = CLIENT_CLOSED_REQUEST
            except Exception:
                # A bug, not bad input: log it with the request id and still answer in JSON.
                log.exception("unhandled error")
                if started:
                    raise
                await _send_json(send_with_headers, 500,
                                 {"error": "internal server error", "code": "internal"})
        finally:
            if priority_token is not None:
                priority_ceiling.reset(priority_token)
            end = perf_counter()
            elapsed = end - ctx.start
            if ctx.admitted:
                self.state.active -= 1
            trace_id = None
            if ctx.trace is not None:
                tracing.current.reset(trace_token)
                trace_id = tracing.finish(ctx.trace, lambda: _span_description(scope, ctx, status),
                                          status >= 500, end)
            if ctx.endpoint is not None:
                if ctx.model_metrics is not None:
                    ctx.model_metrics.request(ctx.endpoint, status, elapsed, trace_id)
                else:
                    metrics.request_without_model(ctx.endpoint, status, elapsed, ctx.model)
            if self.access_log:
                path = scope["path"]
                level = logging.DEBUG if path in _QUIET_PATHS else logging.INFO
                if access_log.isEnabledFor(level):
                    access_log.log(level, "%s %s %d", scope["method"], path, status, extra={
                        "status": status, "ms": round(elapsed * 1000, 3), "model": ctx.model
                        if ctx.endpoint else None, "client": _client(scope)})
            if ctx.rows and ctx.caller is not None:
                self.gate.charge_rows(ctx.caller, ctx.rows)
            if endpoint_scope == "admin":
                audit.record("admin", key=ctx.caller, action=f"{scope['method']} {scope['path']}",
                             status=status, client=_client(scope))
            request_id.reset(token)

def _span_description(scope: Scope, ctx: RequestContext, status: int) -> tracing.Described:
    """The request span (HTTP semantic conventions, and the model's attributes)."""
    return tracing.http_span(scope, status, ctx.model if ctx.endpoint is not None else None,
                             ctx.model_metrics.version if ctx.model_metrics is not None else None,
                             ctx.request_id)


def server_timing(ctx: RequestContext) -> str:
    """The `Server-Timing` value (HTTP header, gRPC trailing metadata) for a finished request."""
    total = f"total;dur={(perf_counter() - ctx.start) * 1000:.3f}"
    if not ctx.batch_rows:
        return total
    return (f"queue;dur={ctx.queue_s * 1000:.3f}, compute;dur={ctx.compute_s * 1000:.3f}, "
            f'batch;desc="{ctx.batch_rows}", {total}')


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None, close: bool = True) -> None:
    data = orjson.dumps(body)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    head.extend((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())
    if close:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})
