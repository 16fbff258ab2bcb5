"""uvicorn's httptools protocol, sending a response's head and body in one write.

uvicorn writes the status line and headers as soon as the app starts a response, and the body in a
second write: two `send` calls and, with TCP_NODELAY, two packets per response, each waking the
client. On the small models, where HTTP rather than compute is the limit, joining them served
~5 % more requests/s (docs/benchmarks.md). The writes a connection makes within one turn of the
event loop are joined and sent at the end of that turn, so nothing waits longer than the turn.

It also bounds a request's head (request line and headers). uvicorn's httptools protocol has no
such limit, and httptools rebuilds a header value that arrives in pieces on each read: one client
streaming a single endless header kept a worker's event loop 100 % busy (111 MB in 10 s) and
health checks on that worker took 2.3 s instead of 2 ms. Past `MAX_HEAD_BYTES` the connection gets
431 and is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics

# nginx allows 4 buffers of 8 KB for a request's headers by default; a V2 or task request needs a
# few hundred bytes.
MAX_HEAD_BYTES = 64 * 1024


class _JoinedWrites:
    """A transport whose writes within one event-loop turn go out as one; everything else is the
    transport's own."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _JoinedWrites(transport, self.loop)  # type: ignore[assignment]
        self._heads_begun = 0
        self._reading_head = False
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        heads_begun = self._heads_begun
        super().data_received(data)
        # Reads that a head spans from start to end are counted whole. The read in which a head
        # begins may also end the message before it, so it is left out: the limit can be passed by
        # one read at most, and a head is never refused for bytes that were not its own.
        if self._reading_head and self._heads_begun == heads_begun:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._heads_begun += 1
        self._reading_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._reading_head = False
        super().on_headers_complete()

    def _refuse_head(self) -> None:
        self.logger.debug("Request head over %d bytes refused.", MAX_HEAD_BYTES)
        metrics.reject(metrics.UNKNOWN_MODEL, "too_large")
        body = orjson.dumps({"error": f"request line and headers exceed {MAX_HEAD_BYTES} bytes",
                             "code": "header_too_large"})
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"content-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()
