"""The ASGI application: factory, lifespan (load models, drain on SIGTERM) and the one place where
errors become HTTP responses."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp

from service import __version__, errors
from service.auth.gate import with_cors
from service.core.executor_client import ExecutorGroup, RemoteExecutor
from service.core.wire import EXECUTOR_SOCKETS_ENV, Address

if TYPE_CHECKING:
    from service.core.executor import LocalExecutor
from service.observability import logging as service_logging
from service.observability import metrics, tracing
from service.server.grpc import server as grpc_server_module
from service.server.rest import demo, docs, explain, health, models, openapi, routing, tasks, v2
from service.server.rest.middleware import ServiceMiddleware
from service.server.rest.schemas import DOC_MODELS
from service.server.state import ServiceState
from service.settings import Settings

log = logging.getLogger("neuroserve.app")
GIL_SWITCH_INTERVAL_S = 0.0005
GC_YOUNG_THRESHOLD = 20_000  # CPython's default is 700 (see `_freeze_heap`)

_REJECTION_REASONS = errors.REJECTION_REASONS
# The route table, in the order FastAPI tries it; `routing.DirectRoutes` serves the prediction routes
# among them without FastAPI's per-request machinery.
ROUTERS = (v2.router, tasks.router, health.router, explain.router, models.router, docs.router, demo.router)

DESCRIPTION = """\
ONNX inference for image, text and speech classifiers.

* **Open Inference Protocol (V2)** under `/v2`, as KServe and Triton speak it, with the binary tensor
  data, classification, statistics, model configuration and model repository extensions:
  `tritonclient.http` works unchanged.
* **Task endpoints** under `/v1`: upload an image or audio file or send text, get the top-k labels.
* **Explanations** at `/v1/explain/{model}`: the same inputs, and which pixels, words or moments of
  the input the answer rests on (occlusion).
* **A page to try the models** at `/`, and these docs, served with no outside resources.
* **Prometheus metrics** at `/metrics`.

Every error is JSON `{"error": message, "code": machine_code}`. Every response carries
`X-Request-ID` (yours, if you sent one) and `Server-Timing` (queue, compute, batch size).
"""


def _json_error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message, "code": code}), status_code=status,
                    headers=headers, media_type="application/json")


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ServiceError)
    ctx = request.scope.get("neuroserve")
    if ctx is not None and ctx.trace is not None:
        ctx.trace.error(exc.code, exc.message)
    reason = _REJECTION_REASONS.get(type(exc))
    if reason is not None:
        metrics.reject(ctx.model if ctx else metrics.UNKNOWN_MODEL, reason)
    if exc.status >= 500 and not isinstance(exc, errors.ModelNotReady | errors.DeadlineExceeded):
        log.error("%s: %s", exc.code, exc.message)
    return _json_error(exc.status, exc.message, exc.code, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    ctx = request.scope.get("neuroserve")
    metrics.reject(ctx.model if ctx else metrics.UNKNOWN_MODEL, "invalid")
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in exc.errors()
    )
    return _json_error(400, problems or "invalid request", "invalid_request")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = str(exc.detail) if exc.detail else code
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    return _json_error(exc.status_code, message, code, dict(exc.headers or {}))


def _freeze_heap(_: asyncio.Task[None]) -> None:
    """Move everything alive once the models are loaded (modules, sessions, routes: ~70,000
    objects) out of the garbage collector's reach. They live as long as the process, yet every full
    collection walked them: a ~14 ms stall of the event loop each time, seen as p99 spikes under
    load (docs/benchmarks.md). Collect first so that no garbage is frozen with them.

    Then collect the young generation every `GC_YOUNG_THRESHOLD` allocations rather than 700: each
    collection walks what the requests in flight hold (their tasks, frames, dicts), finds it alive
    and promotes it, so that older collections walk it again. Requests free what they allocate by
    reference counting; a few more objects per request (a traced request's) set off five times as
    many collections, a cost paid on the event loop (docs/benchmarks.md, "Fewer garbage collections
    and fewer wake-ups")."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _install_drain_on_sigterm(state: ServiceState) -> None:
    """SIGTERM: turn not-ready and refuse new work, wait for admitted requests, then let the server
    (uvicorn's own SIGTERM handler) stop. Only the main thread can own signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    def stop_server() -> None:
        if callable(previous):
            previous(signal.SIGTERM, None)
        else:
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)

    async def drain_then_stop() -> None:
        await state.drain()
        stop_server()

    def on_sigterm(signum: int, frame: Any) -> None:
        if state.draining:  # a second SIGTERM: stop now
            loop.call_soon_threadsafe(stop_server)
            return
        state.draining = True
        loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_stop()))

    signal.signal(signal.SIGTERM, on_sigterm)


class _App(FastAPI):
    def build_middleware_stack(self) -> ASGIApp:
        state = self.state.service
        direct = routing.DirectRoutes(
            ROUTERS, super().build_middleware_stack(), lambda app: ServiceMiddleware(app, state=state),
            {errors.ServiceError: _service_error,
             StarletteHTTPException: _http_error})  # e.g. a malformed multipart body
        return with_cors(direct, state.settings)


def _executor(settings: Settings) -> LocalExecutor | RemoteExecutor | ExecutorGroup:
    """The models in this process, or the executor process's (whose sockets the supervisor names)."""
    sockets = os.environ.get(EXECUTOR_SOCKETS_ENV)
    if sockets:
        addresses = [Address(Path(d)) for d in sockets.split(os.pathsep)]
        if len(addresses) > 1:  # one executor per GPU
            return ExecutorGroup(settings, addresses)
        return RemoteExecutor(settings, addresses[0])
    # Only here: a front-end of an executor process never imports ONNX Runtime.
    from service.core.executor import LocalExecutor

    return LocalExecutor(settings)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service_logging.configure(settings.log_level)
    state = ServiceState(settings, _executor(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The ORT thread needs the GIL briefly before and after each batch; while the event loop is
        # busy with HTTP, CPython would make it wait up to the 5 ms default switch interval.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        gc_thresholds = gc.get_threshold()  # changed once models load (`_freeze_heap`)
        metrics.worker_started()
        # Here, in the worker: the exporter's thread must belong to this process, not a parent.
        tracing.setup(settings.otlp_endpoint, settings.trace_sample_ratio, settings.trace_slow_ms,
                      __version__)
        # In-process models load in the background: live answers at once, ready turns true when
        # every model is warm. With an executor process, each front-end waits until the executor
        # has loaded: its socket listens only once its start-up is over (see
        # service.server.workers), so traffic never meets a cold worker.
        state.load_task = asyncio.create_task(state.executor.start())
        state.load_task.add_done_callback(_freeze_heap)
        if isinstance(state.executor, RemoteExecutor | ExecutorGroup):
            await state.executor.wait_loaded()
        elif settings.workers > 1:
            await asyncio.shield(state.load_task)
        # gRPC in this worker's event loop, over the same state; bound here, after the models with
        # several workers, as the HTTP socket is (see service.server.workers).
        grpc_server = await grpc_server_module.start(state) if settings.grpc_port else None
        _install_drain_on_sigterm(state)
        try:
            yield
        finally:
            state.draining = True
            if grpc_server is not None:
                await grpc_server_module.stop(grpc_server)
            if not state.load_task.done():
                state.load_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await state.load_task
            await state.executor.close()
            await asyncio.to_thread(tracing.shutdown)
            metrics.flush_refusals()
            metrics.worker_stopped()
            gc.unfreeze()  # what this app held may be garbage now (several apps in one process: tests)
            gc.set_threshold(*gc_thresholds)

    app = _App(
        title="neuroserve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "health", "description": "Liveness, readiness and Prometheus metrics"},
            {"name": "v2", "description": "Open Inference Protocol (KServe/Triton V2 REST)"},
            {"name": "v2 repository", "description": "Model repository extension: index, load, unload"},
            {"name": "tasks", "description": "Upload an image, audio clip or text; get top-k labels"},
            {"name": "explain", "description": "Why a model answered what it did: occlusion attributions"},
            {"name": "models", "description": "The models, their inputs and their cards, for clients"},
        ],
        # Served by `service.server.rest.docs` with local assets instead of FastAPI's CDN-loading pages.
        docs_url=None,
        redoc_url=None,
        # FastAPI's own OpenTelemetry instrumentation would ask the global providers on every
        # request; the service traces requests itself (service.observability.tracing).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service = state
    app.add_exception_handler(errors.ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(ServiceMiddleware, state=state)
    for router in ROUTERS:
        app.include_router(router)
    app.mount(docs.ASSETS_URL, docs.assets(), name="docs-assets")
    app.mount(demo.ASSETS_URL, demo.assets(), name="ui")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the wire models of routes that parse bodies themselves, and with the
    validation error documented as the 400 JSON error it really is."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes, tags=app.openapi_tags)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in DOC_MODELS:
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(doc.pop("$defs", {}))
        components[model.__name__] = doc
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    error_ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for path in schema.get("paths", {}).values():
        for op in path.values():
            responses = op.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", {"description": "Invalid request", **error_ref})
    app.openapi_schema = openapi.complete(schema, app.state.service.settings)
    return schema
