"""gRPC calls over `service.server.grpc.http2`: the server that grpcio's generated code registers
its handlers with, and each call's context.

The servicers, the auth interceptor and grpcio's health and reflection services are written
against grpcio's asyncio API (`grpc.RpcMethodHandler`, `grpc.aio.ServerInterceptor`,
`grpc.aio.ServicerContext`); this module serves them as they are. A call's request messages are
cut from its stream's data (length-prefixed, gzip or deflate when the `compressed` flag says so),
checked against the size limit, and decoded with the handler's deserializer; answers go back
uncompressed, with the status, its message and the trailing metadata in the trailers (or alone,
"trailers-only", when a call fails before it has answered anything).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from time import monotonic
from typing import Any, NamedTuple

import grpc

from service.observability import metrics
from service.server.grpc import http2

log = logging.getLogger("neuroserve.grpc")

Metadata = tuple[tuple[str, str | bytes], ...]

_PREFIX = struct.Struct(">BL")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_DECOMPRESSORS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Request headers that are the transport's, not the caller's metadata (as grpcio leaves them out).
_TRANSPORT_HEADERS = frozenset((b"content-type", b"te", b"grpc-timeout", b"grpc-encoding",
                                b"grpc-accept-encoding", b"content-length", b"connection"))
_RESPONSE_HEADERS = http2.STATUS_200 + http2.header_block((
    (b"content-type", b"application/grpc"), (b"grpc-accept-encoding", b"identity,deflate,gzip")))
_OK_TRAILER = http2.literal(b"grpc-status", b"0")


class CallDetails(NamedTuple):  # grpc.HandlerCallDetails, as interceptors see it
    method: str
    invocation_metadata: Metadata


class _Aborted(Exception):
    """Raised by `Call.abort`: the handler has set the call's status and stops."""


class Server:
    """The registry of method handlers and interceptors, the listening socket, the connections."""

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor] = (), *,
                 max_receive_message_length: int, max_header_bytes: int = 65_536,
                 max_connection_age_s: float = 0.0) -> None:
        self.interceptors = tuple(interceptors)
        self.max_connection_age_s = max_connection_age_s
        self.max_message = max_receive_message_length
        self.max_header_bytes = max_header_bytes
        self.methods: dict[str, grpc.RpcMethodHandler] = {}
        self.generic: list[grpc.GenericRpcHandler] = []
        self.connections: set[http2.Connection] = set()
        self.calls: set[Call] = set()
        self.listener: asyncio.Server | None = None

    # -- what grpcio's generated `add_*Servicer_to_server` call --------------------------------------

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}"] = handler

    # -- life ---------------------------------------------------------------------------------------

    async def listen(self, host: str, port: int, *, ssl: Any = None, reuse_port: bool = False) -> int:
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_server(self._connection, host, port, ssl=ssl,
                                                 reuse_port=reuse_port or None, backlog=2048)
        return self.listener.sockets[0].getsockname()[1]

    async def stop(self, grace_s: float) -> None:
        """Stop listening, send GOAWAY (calls in flight go on), wait up to `grace_s` for them,
        then cancel what is left and close."""
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.connections):
            conn.go_away()
        end = monotonic() + grace_s
        while self.calls and monotonic() < end:
            await asyncio.sleep(0.02)
        for call in list(self.calls):
            call.reset()
        for conn in list(self.connections):
            conn.close()
        if self.listener is not None:
            await self.listener.wait_closed()

    def _connection(self) -> http2.Connection:
        return http2.Connection(self._open, self.max_header_bytes, self._made_or_lost,
                                self.max_connection_age_s)

    def _made_or_lost(self, conn: http2.Connection, made: bool) -> None:
        # Counted from connection_made, not from this factory: a TLS handshake that fails never
        # makes (or loses) its connection.
        if made:
            self.connections.add(conn)
            metrics.GRPC_CONNECTIONS.inc()
        else:
            self.connections.discard(conn)
            metrics.GRPC_CONNECTIONS.dec()

    # -- a new stream -------------------------------------------------------------------------------

    def _open(self, conn: http2.Connection, stream: http2.Stream,
              fields: list[tuple[bytes, bytes]]) -> Call:
        path = method = content_type = encoding = timeout = b""
        metadata: list[tuple[str, str | bytes]] = []
        for name, value in fields:
            if name[:1] == b":":
                if name == b":path":
                    path = value
                elif name == b":method":
                    method = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b"grpc-encoding":
                encoding = value
            elif name not in _TRANSPORT_HEADERS:
                key = name.decode("latin-1")
                if key.endswith("-bin"):
                    metadata.append((key, _unbase64(value)))
                else:
                    metadata.append((key, value.decode("latin-1")))
        name = path.decode("latin-1")
        call = Call(self, conn, stream, name, tuple(metadata))
        if method != b"POST" or not content_type.startswith(b"application/grpc"):
            call.fail(grpc.StatusCode.INTERNAL if method == b"POST" else grpc.StatusCode.UNIMPLEMENTED,
                      "a gRPC call is a POST of application/grpc")
            return call
        if timeout:
            try:
                call.deadline = monotonic() + int(timeout[:-1]) * _TIMEOUT_UNITS[chr(timeout[-1])]
            except (ValueError, KeyError):
                call.fail(grpc.StatusCode.INTERNAL, f"bad grpc-timeout {timeout.decode('latin-1')!r}")
                return call
        if encoding and encoding != b"identity":
            call.encoding = _DECOMPRESSORS.get(encoding.decode("latin-1"), -1)
            if call.encoding == -1:
                call.fail(grpc.StatusCode.UNIMPLEMENTED,
                          f"compression {encoding.decode('latin-1')!r} is not supported")
                return call
        handler = self.methods.get(name)
        if handler is None:
            details = CallDetails(name, call.metadata)
            for generic in self.generic:
                if (handler := generic.service(details)) is not None:
                    break
        if handler is None:
            call.fail(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {name}")
            return call
        call.handler = handler
        if handler.request_streaming:
            call.requests = asyncio.Queue()
            call.start()
        return call


class Call:
    """One RPC: its stream's messages in, its answers out, and the `grpc.aio.ServicerContext`
    methods the servicers and the interceptor use."""

    __slots__ = (
        "_code",
        "_details",
        "_trailing",
        "answered",
        "conn",
        "deadline",
        "encoding",
        "handler",
        "message",
        "metadata",
        "method",
        "pieces",
        "requests",
        "server",
        "stream",
        "task",
    )

    def __init__(self, server: Server, conn: http2.Connection, stream: http2.Stream, method: str,
                 metadata: Metadata) -> None:
        self.server = server
        self.conn = conn
        self.stream = stream
        self.method = method
        self.metadata = metadata
        self.deadline: float | None = None
        self.encoding = 0  # zlib's wbits for compressed messages; 0: the caller sent none
        self.handler: grpc.RpcMethodHandler | None = None
        self.pieces = http2.Pieces()  # a message begun in an earlier frame
        self.message: bytes | None = None  # a unary call's request
        self.requests: asyncio.Queue[bytes | None] | None = None  # a streaming call's requests
        self.task: asyncio.Task[None] | None = None
        self.answered = False  # response headers sent
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Sequence[tuple[str, str | bytes]] = ()

    # -- the stream (http2.StreamHandler) -------------------------------------------------------------

    def received(self, data: bytes) -> None:
        # The window is given back as data arrives, not as messages are taken: a message larger
        # than the window must be able to arrive whole (its size is bounded by `max_message`).
        self.conn.consumed(self.stream, len(data))
        if self.handler is None or self._code is not None:
            return  # failed already: the data is dropped
        buf = self.pieces.join(data)
        if buf is None:
            return
        pos, n = 0, len(buf)
        while pos < n:
            if n - pos < 5:
                self.pieces.hold(buf[pos:], 5)
                break
            compressed, length = _PREFIX.unpack_from(buf, pos)
            if length > self.server.max_message:
                self.fail(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"Received message larger than max ({length} vs. {self.server.max_message})")
                return
            if n - pos - 5 < length:
                self.pieces.hold(buf[pos:], 5 + length)
                break
            message = buf[pos + 5:pos + 5 + length]
            pos += 5 + length
            if compressed:
                message = self._decompress(message)
                if message is None:
                    return
            if self.requests is not None:
                self.requests.put_nowait(message)
            elif self.message is None:
                self.message = message
            else:
                self.fail(grpc.StatusCode.UNIMPLEMENTED, "a unary call sent more than one message")
                return

    def ended(self) -> None:
        if self._code is not None or self.handler is None:
            return
        if self.pieces:
            self.fail(grpc.StatusCode.INTERNAL, "the stream ended inside a message")
        elif self.requests is not None:
            self.requests.put_nowait(None)
        elif self.message is None:
            self.fail(grpc.StatusCode.UNIMPLEMENTED, "a unary call sent no message")
        else:
            self.start()

    def start(self) -> None:
        self.server.calls.add(self)
        self.task = asyncio.get_running_loop().create_task(self._run())

    def reset(self) -> None:
        """The peer reset the stream, the connection is gone or the server stops: the handler is
        cancelled."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.requests is not None:
            self.requests.put_nowait(None)

    # -- running the handler ------------------------------------------------------------------------

    async def _run(self) -> None:
        handler = self.handler
        assert handler is not None
        try:
            for interceptor in reversed(self.server.interceptors):
                handler = await self._intercepted(interceptor, handler)
                if handler is None:
                    self.fail(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {self.method}")
                    return
            await self._serve(handler)
        except _Aborted:
            self.finish()
        except asyncio.CancelledError:
            if not self.stream.done:
                self.conn.reset(self.stream)
        except Exception:
            log.exception("unhandled error in %s", self.method)
            self._code, self._details = grpc.StatusCode.UNKNOWN, "Unexpected error in RPC handling"
            self.finish()
        finally:
            self.server.calls.discard(self)

    async def _intercepted(self, interceptor: grpc.aio.ServerInterceptor,
                           handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        async def continuation(_: Any) -> grpc.RpcMethodHandler:
            return handler
        return await interceptor.intercept_service(continuation, CallDetails(self.method, self.metadata))

    async def _serve(self, handler: grpc.RpcMethodHandler) -> None:
        decode: Callable[[bytes], Any] = handler.request_deserializer or (lambda b: b)
        encode: Callable[[Any], bytes] = handler.response_serializer or (lambda m: m)
        if not handler.request_streaming:
            try:
                request = decode(self.message)  # type: ignore[arg-type]
            except Exception:
                self.fail(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
                return
            self.message = None
            if handler.unary_unary is not None:
                self.finish(encode(await handler.unary_unary(request, self)))
                return
            answers = handler.unary_stream(request, self)
        elif handler.stream_unary is not None:
            response = await handler.stream_unary(self._requests(decode), self)
            self.finish(encode(response))
            return
        else:
            answers = handler.stream_stream(self._requests(decode), self)
        async for answer in answers:
            self.write(encode(answer))
        self.finish()

    async def _requests(self, decode: Callable[[bytes], Any]) -> AsyncIterator[Any]:
        assert self.requests is not None
        while (message := await self.requests.get()) is not None:
            try:
                request = decode(message)
            except Exception:
                await self.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
            yield request

    # -- answers ------------------------------------------------------------------------------------

    def write(self, message: bytes) -> None:
        self.conn.send(self.stream, self._headers(), _PREFIX.pack(0, len(message)) + message, None)

    def _headers(self) -> bytes | None:
        """The response headers if this is the call's first answer (they go once)."""
        if self.answered:
            return None
        self.answered = True
        return _RESPONSE_HEADERS

    def finish(self, message: bytes | None = None) -> None:
        """End the call: `message` (a unary answer) if any, then the status in the trailers."""
        if self._code is None or self._code is grpc.StatusCode.OK:
            trailers = _OK_TRAILER
        else:
            trailers = (http2.literal(b"grpc-status", str(self._code.value[0]).encode())
                        + http2.literal(b"grpc-message", _percent_encode(self._details)))
        if self._trailing:
            trailers += _metadata_block(self._trailing)
        if message is not None:
            self.conn.send(self.stream, self._headers(), _PREFIX.pack(0, len(message)) + message, trailers)
        else:  # with no answer sent yet, "trailers-only": the headers and the status in one frame
            self.conn.send(self.stream, None, b"", (self._headers() or b"") + trailers)

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with `code` now (before or instead of its handler)."""
        self._code, self._details = code, details
        if self.task is not None and not self.task.done() and asyncio.current_task() is not self.task:
            self.task.cancel()
        self.finish()

    def _decompress(self, message: bytes) -> bytes | None:
        if not self.encoding:
            self.fail(grpc.StatusCode.INTERNAL, "a compressed message without grpc-encoding")
            return None
        inflater = zlib.decompressobj(self.encoding)
        try:
            # One byte more than allowed tells an oversized message from one that just fits.
            out = inflater.decompress(message, self.server.max_message + 1)
        except zlib.error as e:
            self.fail(grpc.StatusCode.INTERNAL, f"cannot decompress the message: {e}")
            return None
        if len(out) > self.server.max_message:
            self.fail(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"Received message larger than max (over {self.server.max_message} uncompressed)")
            return None
        return out

    # -- grpc.aio.ServicerContext -------------------------------------------------------------------

    def invocation_metadata(self) -> Metadata:
        return self.metadata

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, str | bytes]] = ()) -> None:
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = trailing_metadata
        raise _Aborted(details)

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def peer(self) -> str:
        return self.conn.peer

    def cancelled(self) -> bool:
        return self.task is not None and self.task.cancelled()

    def done(self) -> bool:
        return self.stream.done


def _metadata_block(metadata: Sequence[tuple[str, str | bytes]]) -> bytes:
    fields = []
    for key, value in metadata:
        if key.endswith("-bin"):
            raw = value if isinstance(value, bytes) else value.encode()
            fields.append((key.encode(), base64.b64encode(raw).rstrip(b"=")))
        else:
            fields.append((key.encode(), value.encode() if isinstance(value, str) else value))
    return http2.header_block(fields)


def _unbase64(value: bytes) -> bytes:
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    except ValueError:
        return value


def _percent_encode(text: str) -> bytes:
    """grpc-message's encoding: printable ASCII but '%' as is, every other byte as %XX."""
    raw = text.encode()
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)

