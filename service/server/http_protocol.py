"""uvicorn's httptools protocol, sending a response's head and body in one write.

uvicorn writes the status line and headers as soon as the app starts a response, and the body in a
second write: two `send` calls and, with TCP_NODELAY, two packets per response, each waking the
client. On the small models, where HTTP rather than compute is the limit, joining them served
~5 % more requests/s (docs/benchmarks.md). The writes a connection makes within one turn of the
event loop are joined and sent at the end of that turn, so nothing waits longer than the turn.

It also guards the reading of requests, which uvicorn's httptools protocol leaves unbounded:
- A head (request line and headers) over `max_header_bytes` gets 431. httptools rebuilds a header
  value that arrives in pieces on every read: one client streaming a single endless header kept a
  worker's event loop 100 % busy (111 MB in 10 s) and health checks on that worker took 2.3 s
  instead of 2 ms.
  Every byte of the head counts, including those of the read in which it begins (uvloop reads up
  to 256 KB at once, so a 200 KB head can arrive in one read): the URL and each header are
  counted as the parser hands them over, and the reads of a head still arriving are counted whole.
- A head not complete `read_timeout_s` after its first byte, or a body with no bytes for that
  long, gets 408; a connection that sends nothing for that long is closed. Without this, idle or
  trickling connections (slowloris) were held open for good, each a file descriptor and a task.
- Malformed framing (a bad request line, `Content-Length: abc`, two lengths) gets the service's
  JSON 400 with an `X-Request-ID`, not uvicorn's plain-text one.
- A V2 infer POST that arrives whole in one read, on a connection between requests, while its
  model's queue refuses (`head_refusal`), is answered by `_refuse_whole` before uvicorn's parser
  callbacks run: under overload most requests are refused, and each refusal's CPU is taken from
  the requests being served. Through the callbacks a refusal cost the worker 27 µs with 2,000
  connections; whole, 14 µs (docs/benchmarks.md, "Refusing whole"). Only a message that a second
  httptools parser finds begun and complete alone in the read, keeping the connection open, is
  answered so; anything else takes the ordinary path, which refuses it from its head as before.
- On shutdown (after SIGTERM's grace period), a connection that is between requests is not closed
  at once: a request may already be on its way. It gets `IDLE_CLOSE_S` to begin one, which is
  answered with `Connection: close`; a connection that has not begun a request by then is closed.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from time import perf_counter
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.observability import metrics
from service.server.rest.middleware import new_request_id
from service.settings import Settings

IDLE_CLOSE_S = 0.5

# Set by the app (service.server.rest.shedding.refuser), for a POST to a path: the whole 429
# response when its model's queue refuses it from the head (its body is read by the parser and
# dropped, and the response goes out without an ASGI task); True when the queue admits it (and
# counts it ahead of later requests until it is queued: the request's scope then carries
# ADMITTED_AT_HEAD, so the route does not judge it again); None when it is not for a queue here.
head_refusal: Callable[[bytes, float], bytes | bool | None] | None = None
ADMITTED_AT_HEAD = "neuroserve.admitted_at_head"


class _OneMessage:
    """httptools with two callbacks: whether a read holds exactly one whole request."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.begun = self.complete = 0

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_message_complete(self) -> None:
        self.complete += 1


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops parsing and `send_400_response` answers 431."""


@functools.cache
def _limits() -> tuple[int, float]:
    """(max_header_bytes, read_timeout_s): from the environment the CLI exports to every worker."""
    settings = Settings()
    return settings.max_header_bytes, settings.read_timeout_s


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

    def write_now(self, data: bytes) -> None:
        """Write at once (after anything joined so far): for an answer that is the turn's only one."""
        if self._pending:
            self._flush()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _JoinedWrites(transport, self.loop)  # type: ignore[assignment]
        self._max_head_bytes, self._read_timeout_s = _limits()
        self._heads_begun = 0
        self._reading_head = False
        self._reading_body = False
        self._head_bytes = 0
        self._head_parsed = 0  # bytes of URL and headers the parser has handed over for this head
        self._head_overflow = False
        self._shutting_down = False
        self._waiting_since = self.loop.time()  # for a head: its first byte; for a body: the last read
        self._started = 0.0  # perf_counter() when the current head began
        self._refused: bytes | None = None  # the response to send once the request's body is read
        # `head_refusal`'s answer for the request being read when `_refuse_whole` asked already
        # (True: admitted, False: not judged), or None.
        self._asked: bool | None = None
        self._whole: _OneMessage | None = None  # made on the first request refused whole
        self._answered_at = float("-inf")  # loop.time() when a request refused whole was answered
        # One timer per connection, re-armed as it fires, rather than one per request.
        self._read_timer = self.loop.call_later(self._read_timeout_s, self._check_read_time)

    def connection_lost(self, exc: Exception | None) -> None:
        self._read_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if head_refusal is not None and data.startswith(b"POST ") and not self._reading_head \
                and not self._reading_body and (self.cycle is None or self.cycle.response_complete) \
                and not self.pipeline and not self._shutting_down and self._refuse_whole(data):
            return
        heads_begun = self._heads_begun
        super().data_received(data)
        if self._reading_body:
            self._waiting_since = self.loop.time()
        # Reads that a head spans from start to end are counted whole. The read in which a head
        # begins may also end the message before it, so it is left out: the limit can be passed by
        # one read at most, and a head is never refused for bytes that were not its own.
        if self._reading_head and self._heads_begun == heads_begun:
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head_bytes and not self.transport.is_closing():
                self._refuse(431, b"Request Header Fields Too Large", "header_too_large", "too_large",
                             f"request line and headers exceed {self._max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._heads_begun += 1
        self._reading_head = True
        self._head_bytes = 0
        self._head_parsed = 16  # the method, the version and the request line's separators
        self._waiting_since = self.loop.time()
        self._started = perf_counter()

    def _count_head(self, n: int) -> None:
        self._head_parsed += n
        if self._head_parsed > self._max_head_bytes:
            self._head_overflow = True
            raise _HeadTooLarge

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._reading_body = True
        self._waiting_since = self.loop.time()
        refuse = head_refusal
        decision, self._asked = self._asked, None
        if refuse is not None and decision is None and not self._shutting_down \
                and self.parser.get_method() == b"POST" \
                and (self.cycle is None or self.cycle.response_complete) and not self.pipeline:
            decision = refuse(httptools.parse_url(self.url).path, self._started)
            if isinstance(decision, bytes):
                self._refused = decision
                return  # no cycle, no task: the body is dropped and the response sent when it ends
        super().on_headers_complete()
        if decision is True and self.cycle is not None:
            self.scope[ADMITTED_AT_HEAD] = True  # type: ignore[literal-required]
        if self._shutting_down and self.cycle is not None:
            self.cycle.keep_alive = False

    def send_400_response(self, msg: str) -> None:
        """httptools could not parse the request (or a callback refused it): the JSON error."""
        if self.transport.is_closing():
            return
        if self._head_overflow:
            self._refuse(431, b"Request Header Fields Too Large", "header_too_large", "too_large",
                         f"request line and headers exceed {self._max_head_bytes} bytes")
            return
        self._refuse(400, b"Bad Request", "bad_request", "invalid", "malformed HTTP request")

    def shutdown(self) -> None:
        self._shutting_down = True
        if self.cycle is None or self.cycle.response_complete:
            if not self._reading_head:
                self.loop.call_later(IDLE_CLOSE_S, self._close_if_idle)
            # else: a head is arriving; its request is answered with Connection: close
        else:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        if not self.transport.is_closing() and not self._reading_head \
                and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        if self._refused is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._reading_body = False
        if self._refused is not None:
            response, self._refused = self._refused, None
            if not self.transport.is_closing():
                self.transport.write_now(response)  # type: ignore[attr-defined]
                if not self.parser.should_keep_alive():  # the client said Connection: close
                    self.transport.close()
                    return
                self.on_response_complete()  # keep-alive timer, reading resumed: as after any answer
            return
        super().on_message_complete()

    def _refuse_whole(self, data: bytes) -> bool:
        """Answer the request in `data` with `head_refusal`'s response when `data` is exactly one
        whole request and its model's queue refuses it; False (nothing done) leaves it to the
        ordinary path."""
        head_end = data.find(b"\r\n\r\n")
        line_end = data.find(b"\r\n")
        if head_end < 0 or head_end > self._max_head_bytes or not data.startswith(b" HTTP/1.1", line_end - 9):
            return False
        # Framed as httptools frames it for the ordinary path's parser: one message, begun and
        # complete in this read, after which the connection stays open for the next.
        whole = self._whole or _OneMessage()
        whole.begun = whole.complete = 0
        try:
            whole.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            whole.complete = -1
        if whole.begun != 1 or whole.complete != 1 or not whole.parser.should_keep_alive() \
                or whole.parser.should_upgrade():
            self._whole = None  # its parser may be mid-message or failed: a new one next time
            return False  # the ordinary path answers it (a 400, or the same 429)
        self._whole = whole
        response = head_refusal(data[5:line_end - 9].partition(b"?")[0], perf_counter())  # type: ignore[misc]
        if not isinstance(response, bytes):
            self._asked = response is True  # the ordinary path need not ask again
            return False
        self._heads_begun += 1
        self.server_state.total_requests += 1
        self.transport.write_now(response)  # type: ignore[attr-defined]
        # Idle again. Re-arming uvicorn's keep-alive timer as after any answer cost about a fifth
        # of such a refusal; the timer, when it fires, looks at when the connection last answered.
        self._answered_at = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)
        return True

    def timeout_keep_alive_handler(self) -> None:
        idle = self.loop.time() - self._answered_at
        if idle < self.timeout_keep_alive:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive - idle,
                                                                self.timeout_keep_alive_handler)
            return
        super().timeout_keep_alive_handler()

    def _check_read_time(self) -> None:
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:
            # uvicorn stopped reading (a pipelined request waits, or the app has not taken the
            # body yet): the client is not the one keeping us waiting.
            self._waiting_since = now
        # A connection that has not sent a byte yet waits like a head does.
        waiting = self._reading_head or self._reading_body or self._heads_begun == 0
        waited = now - self._waiting_since
        if waiting and waited >= self._read_timeout_s:
            if self._heads_begun == 0:
                self.transport.close()  # nothing was asked: nothing to answer
            else:
                part = "request line and headers" if self._reading_head else "request body"
                self._refuse(408, b"Request Timeout", "read_timeout", "read_timeout",
                             f"{part} not received within {self._read_timeout_s:g} s")
            return
        wait = self._read_timeout_s - waited if waiting else self._read_timeout_s
        self._read_timer = self.loop.call_later(max(wait, 0.0), self._check_read_time)

    def _refuse(self, status: int, phrase: bytes, code: str, rejection: str, message: str) -> None:
        """Answer before the request was read to its end, then close: the rest cannot be trusted.
        `code` is the error body's; `rejection` the `neuroserve_rejections_total` reason."""
        self.logger.debug("Refused %d: %s", status, message)
        metrics.reject(metrics.UNKNOWN_MODEL, rejection)
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # a response is already on its way: no second one
            return
        body = orjson.dumps({"error": message, "code": code})
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"x-request-id: %s\r\nconnection: close\r\n\r\n%s"
                             % (status, phrase, len(body), new_request_id().encode(), body))
        self.transport.close()
