"""The V2 gRPC server (`inference.GRPCInferenceService`, as Triton serves it on port 8001), beside
REST in the same worker process and event loop, over the same `ServiceState`.

A thin servicer: each RPC converts its message (`service.server.grpc.codec`), calls what the REST routes
call (`service.server.inference.infer`, the metadata, statistics and repository helpers of
`service.server.rest.v2`), and turns a `ServiceError` into the gRPC status the error names. Inference RPCs
are counted like REST ones (`neuroserve_requests_total` and the duration histogram with the
`grpc_infer` endpoint and the HTTP-equivalent code, rejections by reason), take part in the drain
on SIGTERM (they count in `ServiceState.active`), and carry the request id and `server-timing` in
trailing metadata. Also served: `grpc.health.v1` (SERVING while ready) and server reflection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from time import perf_counter
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service import __version__
from service.auth.gate import Gate
from service.auth.grpc_interceptor import AuthInterceptor
from service.errors import REJECTION_REASONS, DeadlineExceeded, ModelNotReady, ServiceError
from service.observability import metrics, tracing
from service.observability.logging import request_id
from service.server import inference, tls
from service.server.grpc import calls, codec
from service.server.rest import v2
from service.server.rest.middleware import RequestContext, new_request_id, server_timing, valid_request_id
from service.server.state import ServiceState

log = logging.getLogger("neuroserve.grpc")
SERVICE_NAME = "inference.GRPCInferenceService"
ENDPOINT = "grpc_infer"  # the `endpoint` label of gRPC inferences (REST's is v2_infer)
# By the time the server stops, the drain has already waited for admitted requests; this only
# lets answers being written finish.
STOP_GRACE_S = 2.0
HEALTH_POLL_S = 0.5


async def _abort(context: grpc.aio.ServicerContext, error: ServiceError) -> NoReturn:
    await context.abort(grpc.StatusCode[error.grpc], error.message)
    raise AssertionError("abort raises")


def _request_id(context: grpc.aio.ServicerContext | None, fallback: str) -> str:
    """The caller's `x-request-id` metadata, else the request's own id, else a new one."""
    if context is not None:
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id" and isinstance(value, str) and valid_request_id(value.encode()):
                return value
    if fallback and valid_request_id(fallback.encode()):
        return fallback
    return new_request_id()


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServiceState) -> None:
        self.state = state

    # -- health and metadata ------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.state.live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        # As Triton answers: not ready (rather than an error) for a model it does not know.
        try:
            self.state.repository.get(request.name, request.version or None)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="neuroserve", version=__version__, extensions=v2.EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        try:
            found = v2.model_and_versions(self.state.repository, request.name, request.version or None)
        except ServiceError as e:
            await _abort(context, e)
        return codec.model_metadata(v2.metadata_doc(*found))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ModelConfigResponse:
        try:
            found = v2.model_and_versions(self.state.repository, request.name, request.version or None)
        except ServiceError as e:
            await _abort(context, e)
        return codec.model_config(v2.triton_config_doc(*found, self.state.settings.cuda_device_id))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
                              ) -> pb.ModelStatisticsResponse:
        try:
            docs = await self.state.executor.statistics(request.name or None, request.version or None)
        except ServiceError as e:
            await _abort(context, e)
        return codec.model_statistics(docs)

    # -- model repository ---------------------------------------------------------------------------

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
                              ) -> pb.RepositoryIndexResponse:
        return codec.repository_index(self.state.repository.index(ready_only=request.ready))

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:
        params = {k: codec.parameter(v) for k, v in request.parameters.items()}
        try:
            await v2.load_model(self.state, request.model_name, params)
        except ServiceError as e:
            await _abort(context, e)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        try:
            await v2.unload_model(self.state, request.model_name)
        except ServiceError as e:
            await _abort(context, e)
        return pb.RepositoryModelUnloadResponse()

    # -- inference ----------------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        ctx = RequestContext(_request_id(context, request.id), perf_counter())
        try:
            response = await self._infer(request, ctx, context.time_remaining(), "ModelInfer",
                                         context.invocation_metadata())
        except ServiceError as e:
            context.set_trailing_metadata(self._trailers(ctx))
            await _abort(context, e)
        context.set_trailing_metadata(self._trailers(ctx))
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request is served as soon as it arrives; answers go back in completion order, each
        with its request's id (an error as `error_message`, the stream staying open)."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        # Each request of the stream is its own span, under the caller's trace of the stream.
        metadata = context.invocation_metadata() if tracing.enabled else None
        tasks: set[asyncio.Task[None]] = set()

        async def serve(request: pb.ModelInferRequest) -> None:
            ctx = RequestContext(_request_id(None, request.id), perf_counter())
            try:
                result = await self._infer(request, ctx, None, "ModelStreamInfer", metadata)
                answer = pb.ModelStreamInferResponse(infer_response=result)
            except Exception as e:  # the stream answers on: a failed request is one error message
                message = e.message if isinstance(e, ServiceError) else "internal server error"
                failed = pb.ModelInferResponse(model_name=request.model_name,
                                               model_version=request.model_version, id=request.id)
                answer = pb.ModelStreamInferResponse(error_message=message, infer_response=failed)
            await answers.put(answer)

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.create_task(serve(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*tasks)
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # re-raises a failure to read the stream
        finally:
            for task in (reader, *tasks):
                task.cancel()

    async def _infer(self, request: pb.ModelInferRequest, ctx: RequestContext,
                     remaining_s: float | None, method: str, metadata: Any) -> pb.ModelInferResponse:
        """One inference with the bookkeeping ServiceMiddleware does for REST: in-flight count,
        request metrics, rejections, the request id in the logs, the trace."""
        state = self.state
        token = request_id.set(ctx.request_id)
        ctx.endpoint = ENDPOINT
        status = 500
        code = grpc.StatusCode.UNKNOWN
        trace_token = None
        if tracing.enabled:
            ctx.trace = tracing.begin_grpc(metadata, ctx.start)
            trace_token = tracing.current.set(ctx.trace)
        try:
            if request.model_name in state.repository.models:
                ctx.model = request.model_name
            mv = state.model(request.model_name, request.model_version or None)
            ctx.model_metrics = mv.metrics
            state.active += 1
            ctx.admitted = True
            req = codec.decode_infer(request)
            result = await inference.infer(mv, req, self._deadline(ctx.start, req.timeout_s, remaining_s),
                                           pinned=bool(request.model_version), arrived=ctx.start)
            ctx.timed(result.queue_s, result.compute_s, result.batch_rows)
            response = codec.encode_infer(result, request.id)
            status = 200
            code = grpc.StatusCode.OK
            return response
        except ServiceError as e:
            status = e.status
            code = grpc.StatusCode[e.grpc]
            if ctx.trace is not None:
                ctx.trace.error(e.code, e.message)
            reason = REJECTION_REASONS.get(type(e))
            if reason is not None:
                metrics.reject(ctx.model, reason)
            if e.status >= 500 and not isinstance(e, ModelNotReady | DeadlineExceeded):
                log.error("%s: %s", e.code, e.message)
            raise
        except asyncio.CancelledError:
            status = 499  # the caller went away (cancelled, or its deadline passed)
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("unhandled error")
            raise
        finally:
            end = perf_counter()
            elapsed = end - ctx.start
            if ctx.admitted:
                state.active -= 1
            trace_id = None
            if ctx.trace is not None:
                tracing.current.reset(trace_token)
                trace_id = self._finish_trace(ctx, method, code, end)
            if ctx.model_metrics is not None:
                ctx.model_metrics.request(ENDPOINT, status, elapsed, trace_id)
            else:
                metrics.request_without_model(ENDPOINT, status, elapsed, ctx.model)
            request_id.reset(token)

    @staticmethod
    def _finish_trace(ctx: RequestContext, method: str, code: grpc.StatusCode, end: float) -> str | None:
        assert ctx.trace is not None
        number = code.value[0]

        def describe() -> tracing.Described:
            return tracing.grpc_span(SERVICE_NAME, method, number, ctx.model,
                                     ctx.model_metrics.version if ctx.model_metrics is not None else None,
                                     ctx.request_id)

        if tracing.grpc_error(number) and ctx.trace.error_type is None:
            ctx.trace.error(code.name, code.name)
        return tracing.finish(ctx.trace, describe, tracing.grpc_error(number), end)

    def _deadline(self, start: float, timeout_s: float | None, remaining_s: float | None) -> float | None:
        """The sooner of `parameters.timeout` and the call's gRPC deadline, else the default."""
        budgets = [t for t in (timeout_s, remaining_s) if t is not None]
        if not budgets and self.state.settings.default_timeout_ms:
            budgets.append(self.state.settings.default_timeout_ms / 1000)
        return start + min(budgets) if budgets else None

    @staticmethod
    def _trailers(ctx: RequestContext) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", ctx.request_id), ("server-timing", server_timing(ctx)))


class HealthServicer(health_pb2_grpc.HealthServicer):
    """`grpc.health.v1`: SERVING while the server is ready (the REST readiness probe's answer), for
    the whole server ("") and for the inference service."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def _status(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType | None:
        if service not in ("", SERVICE_NAME):
            return None
        ok = self.state.ready()
        return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> health_pb2.HealthCheckResponse:
        status = self._status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self._status(request.service)
            if status is None:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_POLL_S)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(state: ServiceState) -> calls.Server:
    """Listen on `settings.grpc_port`. With several workers each binds the port with SO_REUSEPORT
    (like their HTTP sockets, see `service.server.workers`); with one, a port in use is an error."""
    settings = state.settings
    server = calls.Server([AuthInterceptor(Gate.of(state))],
                          max_receive_message_length=settings.max_body_bytes,
                          max_header_bytes=settings.max_header_bytes,
                          max_connection_age_s=settings.grpc_max_connection_age_s)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(state), server)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection_aio.ReflectionServicer(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)),
        server)
    address = _address(settings.host, settings.grpc_port)
    try:
        await server.listen(settings.host, settings.grpc_port, ssl=tls.grpc_context(settings),
                            reuse_port=settings.workers > 1)
    except OSError as e:
        raise OSError(f"cannot listen for gRPC on {address}: {e}") from None
    log.info("gRPC listening", extra={"address": address})
    return server


async def stop(server: calls.Server) -> None:
    """Refuse new RPCs and give those in flight `STOP_GRACE_S` to finish."""
    await server.stop(STOP_GRACE_S)
