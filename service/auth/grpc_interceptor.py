"""The gate for gRPC: the `authorization` metadata (`Bearer <key>`) checked before the servicer
runs, with the scopes and quotas REST uses (one `Gate` per worker). A refused call ends with
UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED; a stream is checked once, when it opens.
State-changing calls write their audit line when they have answered."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.auth import audit
from service.auth import metrics as key_metrics
from service.auth.gate import Gate, grpc_scope, priority_ceiling
from service.errors import ServiceError


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        scope = grpc_scope(details.method)
        if scope == "open":
            return await continuation(details)
        authorization = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode("latin-1")
        try:
            caller = self.gate.authenticate(scope, authorization)
        except ServiceError as exc:
            self.gate.refused(exc, action=details.method, client=None)
            return _refusing(await continuation(details), exc)
        key_metrics.admitted(caller.name)
        handler = await continuation(details)
        if scope == "admin":
            return _audited(handler, caller.name, details.method)
        if caller.priority and details.method.endswith(("/ModelInfer", "/ModelStreamInfer")):
            handler = _with_priority(handler, caller.priority)
        if caller.key is not None and caller.key.rows > 0 and details.method.endswith("/ModelInfer"):
            return _charging_rows(handler, self.gate, caller.key.name)
        return handler


def _with_priority(handler: grpc.RpcMethodHandler | None, priority: int) -> grpc.RpcMethodHandler | None:
    """`handler` (ModelInfer or ModelStreamInfer) serving with its key's priority as the ceiling of
    its requests' classes (`service.auth.gate.priority_of`)."""
    if handler is None:
        return handler
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def prioritized(request: Any, context: grpc.aio.ServicerContext) -> Any:
            priority_ceiling.set(priority)  # this call's own context
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            prioritized, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    if handler.stream_stream is not None:
        stream = handler.stream_stream

        async def prioritized_stream(requests: AsyncIterator[Any],
                                     context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            priority_ceiling.set(priority)  # the stream's requests are served in tasks copying it
            async for answer in stream(requests, context):
                yield answer

        return grpc.stream_stream_rpc_method_handler(
            prioritized_stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    return handler


def _audited(handler: grpc.RpcMethodHandler | None, key: str | None,
             method: str) -> grpc.RpcMethodHandler | None:
    """`handler` (a unary call that changes state), writing its audit line once it has answered."""
    if handler is None or handler.unary_unary is None:
        return handler
    behaviour = handler.unary_unary

    async def audited(request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = "OK"
        try:
            return await behaviour(request, context)
        except BaseException:
            code = context.code()
            status = code.name if isinstance(code, grpc.StatusCode) else "ERROR"
            raise
        finally:
            audit.record("admin", key=key, action=method, status=status, client=context.peer())

    return grpc.unary_unary_rpc_method_handler(audited, request_deserializer=handler.request_deserializer,
                                              response_serializer=handler.response_serializer)


def _charging_rows(handler: grpc.RpcMethodHandler | None, gate: Gate,
                   key: str) -> grpc.RpcMethodHandler | None:
    """`handler` (ModelInfer), charging the request's rows to the key's row quota once answered."""
    if handler is None or handler.unary_unary is None:
        return handler
    behaviour = handler.unary_unary

    async def charging(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        finally:
            shapes = [list(i.shape) for i in request.inputs if i.shape]
            gate.charge_rows(key, max((s[0] for s in shapes), default=1))

    return grpc.unary_unary_rpc_method_handler(charging, request_deserializer=handler.request_deserializer,
                                              response_serializer=handler.response_serializer)


def _refusing(handler: grpc.RpcMethodHandler | None, exc: ServiceError) -> grpc.RpcMethodHandler | None:
    """A handler of the same kind as `handler` that ends the call with `exc`'s status."""
    if handler is None:
        return None
    code = grpc.StatusCode[exc.grpc]

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, exc.message)

    async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, exc.message)
        yield  # an async generator, as a streaming handler is

    kinds = {(False, False): (grpc.unary_unary_rpc_method_handler, unary),
             (False, True): (grpc.unary_stream_rpc_method_handler, stream),
             (True, False): (grpc.stream_unary_rpc_method_handler, unary),
             (True, True): (grpc.stream_stream_rpc_method_handler, stream)}
    make, behaviour = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(behaviour, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
