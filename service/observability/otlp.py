"""The span exporter process: turns the compact span records a front-end hands over into OTLP/HTTP
protobuf export requests and sends them to the collector.

Why a process of its own: encoding spans with the SDK's OTLP encoder costs about 120 µs of Python
per traced request (five spans), and in the serving process that work holds the GIL against the
event loop (docs/benchmarks.md, "Tracing: what OpenTelemetry costs"). Here a front-end only appends
one tuple per request to a queue; a thread of its own packs them with msgpack and pushes them over
a ZeroMQ socket to this process, which expands each record into its spans, encodes the protobuf
directly (the OTLP trace messages are few and stable: a dozen field tags below) and posts it.

One exporter process per front-end, started by it (`tracing.setup`) and ended by it: the process
exits when its stdin closes, which happens too when the front-end dies. It reads the exporter and
batching variables as the SDK does: OTEL_EXPORTER_OTLP_[TRACES_]{HEADERS,TIMEOUT,COMPRESSION,
CERTIFICATE,CLIENT_CERTIFICATE,CLIENT_KEY} and OTEL_BSP_{SCHEDULE_DELAY,MAX_QUEUE_SIZE,
MAX_EXPORT_BATCH_SIZE,EXPORT_TIMEOUT}. Two timeouts bound an export: OTEL_EXPORTER_OTLP_TIMEOUT
(seconds, as the Python SDK reads it; default 10) is the exporter's, the time it may spend on one
batch, retries included, and the timeout of each socket operation; OTEL_BSP_EXPORT_TIMEOUT
(milliseconds, default 30000) is the batch processor's, the longest an export may take at all.
Past the shorter of the two the export is abandoned, its batch dropped, even while a collector
that accepted the connection is still trickling its answer or never sends one (a timer, SIGALRM,
interrupts the blocked socket call). If this process dies anyway, its front-end starts another.

A pack, as msgpack: (constants: {id: (name, attributes, variable names)}, records). Two kinds of
record, as arrays:
- a request (its first field a number: the id of its span's constants, which the pack carries):
    (constants id, trace_id: 16 bytes, span_id: 8 bytes, parent_span_id: 8 bytes | None,
     trace_state: str, start, end, values (of the constants' variable names; None: absent),
     error_type: str | None, error: str | None (status ERROR with this message; None: unset),
     enqueued (end of decoding, 0: never queued), answered (start of encoding, 0: none),
     batches: [(enqueued, start, end, rows, requests), ...])
  becomes its SERVER span and the INTERNAL spans decode, queue and compute (one pair per batch),
  encode. What a span shares with the others of its route, model and client (method, route,
  server, client address, user agent, model: a dozen attributes) is sent once per pack and
  encoded once per process, not decoded and encoded for each request.
- any other span (a batch's):
    (trace_id, span_id, parent_span_id | None, trace_state, kind: int, name: str, start, end,
     attributes: dict | None, error: str | None, links: [(trace_id, span_id), ...] | None,
     children: [(name, start, end, attributes | None), ...] | None)
Times are `time.perf_counter()` seconds (CLOCK_MONOTONIC, the same in every process of the machine);
children are INTERNAL spans in the record's trace whose parent is the record's span.
"""

from __future__ import annotations

import gc
import gzip
import http.client
import logging
import os
import random
import signal
import ssl
import struct
import sys
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import msgspec

log = logging.getLogger("neuroserve.tracing")

SPAN_KIND_INTERNAL = 1
SPAN_KIND_SERVER = 2
STATUS_ERROR = 2

_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_INT64 = (1 << 64) - 1
_getrandbits = random.getrandbits


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: tag, length, body."""
    return tag + _varint(len(body)) + body


def _any_value(value: Any) -> bytes:
    """An AnyValue message (common.proto)."""
    if isinstance(value, str):
        return _len(b"\x0a", value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & _INT64)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return _len(b"\x3a", value)
    if isinstance(value, (list, tuple)):
        return _len(b"\x2a", b"".join(_len(b"\x0a", _any_value(v)) for v in value))
    return _len(b"\x0a", str(value).encode())


def _key_value(key: str, value: Any) -> bytes:
    """A KeyValue message."""
    return _len(b"\x0a", key.encode()) + _len(b"\x12", _any_value(value))


def attributes(values: dict[str, Any] | None, tag: bytes) -> bytes:
    """Repeated KeyValue field `tag` (resource 1, span 9)."""
    if not values:
        return b""
    return b"".join(_len(tag, _key_value(k, v)) for k, v in values.items())


_span_attributes: dict[tuple[str, Any, type], bytes] = {}


def _span_attribute(key: str, value: Any) -> bytes:
    """A span's attribute field; most (key, value) pairs repeat from span to span, so they are kept."""
    cache_key = (key, value, type(value))  # True == 1, but they encode differently
    try:
        return _span_attributes[cache_key]
    except KeyError:
        pass
    except TypeError:  # unhashable (a list)
        return _len(b"\x4a", _key_value(key, value))
    encoded = _len(b"\x4a", _key_value(key, value))
    if len(_span_attributes) > 8192:  # request ids and ports never repeat: start over now and then
        _span_attributes.clear()
    _span_attributes[cache_key] = encoded
    return encoded


def _attributes(values: dict[str, Any]) -> bytes:
    return b"".join([_span_attribute(k, v) for k, v in values.items()])


_names: dict[str, bytes] = {}


def _name(name: str) -> bytes:
    try:
        return _names[name]
    except KeyError:
        encoded = _len(b"\x2a", name.encode())
        if len(_names) < 1024:
            _names[name] = encoded
        return encoded


# Field 6 (kind) with its value, and the tag of field 7 (start time) that follows it.
_KIND = [b"\x30" + _varint(kind) + b"\x39" for kind in range(6)]


_INTERNAL_START = _KIND[SPAN_KIND_INTERNAL]


def span(trace_id: bytes, span_id: bytes, parent_id: bytes | None, trace_state: str, kind: int,
         name: str, start_ns: int, end_ns: int, attrs: dict[str, Any] | None,
         error: str | None, links: Iterable[tuple[bytes, bytes]] | None) -> bytes:
    """One Span message (trace.proto), as the field of ScopeSpans that holds it."""
    parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
    if trace_state:
        parts.append(_len(b"\x1a", trace_state.encode()))
    if parent_id:
        parts += (b"\x22\x08", parent_id)
    parts += (_name(name), _KIND[kind], _pack_q(start_ns), b"\x41", _pack_q(end_ns))
    if attrs:
        parts.append(_attributes(attrs))
    if links:
        parts += [b"\x6a\x1c\x0a\x10" + tid + b"\x12\x08" + sid for tid, sid in links]  # 28-byte Link
    if error is not None:
        parts.append(_len(b"\x7a", (_len(b"\x12", error.encode()) if error else b"") + b"\x18\x02"))
    return _len(b"\x12", b"".join(parts))


def spans_of(record: list[Any] | tuple[Any, ...], epoch_offset_ns: int) -> list[bytes]:
    """The encoded spans of one record: its own and its children's."""
    (trace_id, span_id, parent_id, trace_state, kind, name, start, end, attrs, error, links,
     children) = record
    out = [span(trace_id, span_id, parent_id, trace_state, kind, name,
                int(start * 1e9) + epoch_offset_ns, int(end * 1e9) + epoch_offset_ns, attrs, error,
                links)]
    if children:
        out += _children(trace_id, span_id, trace_state, epoch_offset_ns, [
            (_name(n), child_start, child_end, _attributes(a) if a else b"")
            for n, child_start, child_end, a in children])
    return out


def _children(trace_id: bytes, span_id: bytes, trace_state: str, epoch_offset_ns: int,
              children: list[tuple[bytes, float, float, bytes]]) -> list[bytes]:
    """INTERNAL spans under `span_id`, from (encoded name, start, end, encoded attributes)."""
    # Children differ from one another only in id, name, times and attributes: the rest is packed
    # once (this loop is most of the exporter's work).
    head = b"\x0a\x10" + trace_id + b"\x12\x08"
    tail = (_len(b"\x1a", trace_state.encode()) if trace_state else b"") + b"\x22\x08" + span_id
    ids = _getrandbits(64 * len(children)).to_bytes(8 * len(children), "little")
    out = []
    for i, (name, child_start, child_end, attrs) in enumerate(children):
        start_ns = int(child_start * 1e9) + epoch_offset_ns
        body = b"".join((head, ids[8 * i:8 * i + 8], tail, name, _INTERNAL_START, _pack_q(start_ns),
                         b"\x41", _pack_q(max(start_ns, int(child_end * 1e9) + epoch_offset_ns)), attrs))
        out.append(b"\x12" + _varint(len(body)) + body)
    return out


class Constants:
    """A request span's constants (from `tracing.SpanConstants`) as the exporter encodes them."""

    __slots__ = ("attributes", "name", "variable")

    def __init__(self, name: str, attributes: dict[str, Any], variable: list[str]) -> None:
        self.name = _len(b"\x2a", name.encode())
        self.attributes = _attributes(attributes)
        self.variable = [(key, _len(b"\x0a", key.encode())) for key in variable]


def _variable_attribute(key: str, encoded_key: bytes, value: Any) -> bytes:
    """A span attribute of a request's own: numbers (a status, a port) repeat and come from the
    cache; strings (request ids) do not, and are encoded as they are."""
    if type(value) is not str:
        return _span_attribute(key, value)
    encoded = value.encode()
    any_value = b"\x0a" + _varint(len(encoded)) + encoded
    key_value = encoded_key + b"\x12" + _varint(len(any_value)) + any_value
    return b"\x4a" + _varint(len(key_value)) + key_value


def request_spans(record: list[Any] | tuple[Any, ...], const: Constants, epoch_offset_ns: int) -> list[bytes]:
    """The encoded spans of one request record: its server span, and the decode, queue, compute and
    encode spans inside it."""
    (_, trace_id, span_id, parent_id, trace_state, start, end, values, error_type, error, enqueued,
     answered, batches) = record
    start_ns, end_ns = int(start * 1e9) + epoch_offset_ns, int(end * 1e9) + epoch_offset_ns
    parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
    if trace_state:
        parts.append(_len(b"\x1a", trace_state.encode()))
    if parent_id:
        parts += (b"\x22\x08", parent_id)
    parts += (const.name, _KIND[SPAN_KIND_SERVER], _pack_q(start_ns), b"\x41", _pack_q(end_ns),
              const.attributes)
    for (key, encoded_key), value in zip(const.variable, values, strict=True):
        if value is not None:
            parts.append(_variable_attribute(key, encoded_key, value))
    if error_type is not None:
        parts.append(_span_attribute("error.type", error_type))
    if error is not None:
        parts.append(_len(b"\x7a", (_len(b"\x12", error.encode()) if error else b"") + b"\x18\x02"))
    out = [_len(b"\x12", b"".join(parts))]
    children: list[tuple[bytes, float, float, bytes]] = []
    if enqueued:
        children.append((_DECODE, start, enqueued, b""))
    last_end = 0.0
    for queued_at, batch_start, batch_end, rows, requests in batches:
        children.append((_QUEUE, queued_at, batch_start, b""))
        attrs = _span_attribute("batch.size", rows) + _span_attribute("batch.requests", requests)
        children.append((_COMPUTE, batch_start, batch_end, attrs))
        last_end = max(last_end, batch_end)
    if answered and last_end:
        children.append((_ENCODE, answered, end, b""))
    if children:
        out += _children(trace_id, span_id, trace_state, epoch_offset_ns, children)
    return out


_DECODE, _QUEUE, _COMPUTE, _ENCODE = (_name(n) for n in ("decode", "queue", "compute", "encode"))


def export_request(resource: dict[str, Any], scope: tuple[str, str], spans: list[bytes]) -> bytes:
    """An ExportTraceServiceRequest of one resource and one scope."""
    name, version = scope
    scope_msg = _len(b"\x0a", name.encode()) + (_len(b"\x12", version.encode()) if version else b"")
    scope_spans = _len(b"\x0a", scope_msg) + b"".join(spans)
    resource_spans = _len(b"\x0a", attributes(resource, b"\x0a")) + _len(b"\x12", scope_spans)
    return _len(b"\x0a", resource_spans)


# -- the exporter process ---------------------------------------------------------------------------


class Config(msgspec.Struct):
    """What the front-end tells its exporter process (argv[1], msgpack, hex)."""

    endpoint: str
    address: str  # the ZeroMQ endpoint records arrive on (this process binds it)
    resource: dict[str, Any]
    scope: tuple[str, str]
    epoch_offset_ns: int


def _env(name: str, default: str = "") -> str:
    """OTEL_EXPORTER_OTLP_TRACES_<name>, else OTEL_EXPORTER_OTLP_<name>, as the SDK reads them."""
    return (os.environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
            or os.environ.get(f"OTEL_EXPORTER_OTLP_{name}") or default).strip()


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "").strip() or default)
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", name, os.environ.get(name), default)
        return default


class ExportTimeout(Exception):
    """An export ran past OTEL_BSP_EXPORT_TIMEOUT (raised by the SIGALRM handler)."""


def _export_timed_out(signum: int, frame: object) -> None:
    raise ExportTimeout


class Sender:
    """POSTs export requests as the SDK's OTLP/HTTP exporter does (headers, gzip, TLS with a CA
    certificate and a client certificate, timeout, retries with backoff on connection errors and
    the status codes OTLP calls retryable, within the timeout), over one kept-alive connection.

    http.client rather than requests (which the SDK uses): a POST cost 660 µs of CPU through
    requests and 92 µs through http.client, and this process shares the machine's cores with the
    service it exports for."""

    RETRYABLE = frozenset({429, 502, 503, 504})

    def __init__(self, endpoint: str, export_timeout_s: float | None = None) -> None:
        """`export_timeout_s` (OTEL_BSP_EXPORT_TIMEOUT): the most one `send` may take, enforced with
        SIGALRM, so only in the main thread of a process that leaves SIGALRM to it; None: no cap
        beyond OTEL_EXPORTER_OTLP_TIMEOUT, which the socket timeouts and retries keep to."""
        from opentelemetry.util.re import parse_env_headers

        url = urlsplit(endpoint)
        self.endpoint = endpoint
        self.target = (url.path or "/v1/traces") + (f"?{url.query}" if url.query else "")
        self.headers = {**parse_env_headers(_env("HEADERS"), liberal=True),
                        "Content-Type": "application/x-protobuf"}
        self.gzip = _env("COMPRESSION").lower() == "gzip"
        if self.gzip:
            self.headers["Content-Encoding"] = "gzip"
        try:
            self.timeout_s = float(_env("TIMEOUT") or 10)
        except ValueError:
            log.warning("OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT=%r is not a number; using 10 s", _env("TIMEOUT"))
            self.timeout_s = 10.0
        self.export_timeout_s = export_timeout_s
        if export_timeout_s is not None:
            signal.signal(signal.SIGALRM, _export_timed_out)
        host, port = url.hostname or "localhost", url.port
        if url.scheme == "https":
            context = ssl.create_default_context(cafile=_env("CERTIFICATE") or None)
            client_cert = _env("CLIENT_CERTIFICATE")
            if client_cert:
                context.load_cert_chain(client_cert, _env("CLIENT_KEY") or None)
            self._connect = lambda: http.client.HTTPSConnection(host, port, timeout=self.timeout_s,
                                                                context=context)
        else:
            self._connect = lambda: http.client.HTTPConnection(host, port, timeout=self.timeout_s)
        self.connection: http.client.HTTPConnection | None = None
        self.failures = 0

    def _post(self, body: bytes) -> int:
        if self.connection is None:
            self.connection = self._connect()
        try:
            self.connection.request("POST", self.target, body=body, headers=self.headers)
            response = self.connection.getresponse()
            response.read()
        except BaseException:
            self.connection.close()
            self.connection = None
            raise
        if response.will_close:
            self.connection.close()
            self.connection = None
        return response.status

    def send(self, body: bytes) -> bool:
        """Export one request; False when it failed or was abandoned (the batch is dropped)."""
        if self.export_timeout_s is None:
            return self._send(body, time.monotonic() + self.timeout_s)
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, self.export_timeout_s)
                return self._send(body, time.monotonic() + min(self.timeout_s, self.export_timeout_s))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except ExportTimeout:
            # _post closed the connection it was blocked on: the next export opens a new one.
            self._failed(f"abandoned after OTEL_BSP_EXPORT_TIMEOUT={self.export_timeout_s * 1000:g} ms")
            return False

    def _failed(self, reason: str) -> None:
        self.failures += 1
        if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
            log.warning("span export to %s failed (%s), %d times so far",
                        self.endpoint, reason, self.failures)

    def _send(self, body: bytes, deadline: float) -> bool:
        if self.gzip:
            body = gzip.compress(body)
        delay = 0.5
        while True:
            try:
                status = self._post(body)
                if 200 <= status < 300:
                    return True
                retry, reason = status in self.RETRYABLE, f"HTTP {status}"
            except (OSError, http.client.HTTPException) as exc:
                retry, reason = True, type(exc).__name__
            if not retry or time.monotonic() + delay > deadline:
                self._failed(reason)
                return False
            time.sleep(delay)
            delay *= 2


def serve(config: Config) -> None:
    """Receive records until stdin closes, export them in batches, send what is left, exit."""
    import zmq

    # Decoding a pack makes thousands of lists and tuples, each a cyclic-GC allocation: with the
    # collector on, decoding cost three times as much. Nothing here makes reference cycles in the
    # steady state, so the collector runs only between exports (`export`), at most every 10 s.
    gc.disable()
    next_collect = time.monotonic() + 10.0

    schedule_s = _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
    max_queue = max(1, _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048))
    max_batch = max(1, min(max_queue, _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)))
    export_timeout_ms = _env_int("OTEL_BSP_EXPORT_TIMEOUT", 30000)
    if export_timeout_ms <= 0:
        log.warning("OTEL_BSP_EXPORT_TIMEOUT=%d is not a positive number of ms; using 30000",
                    export_timeout_ms)
        export_timeout_ms = 30000
    sender = Sender(config.endpoint, export_timeout_ms / 1000)
    decoder = msgspec.msgpack.Decoder()
    context = zmq.Context(1)
    pull = context.socket(zmq.PULL)
    pull.bind(config.address)
    stdin = sys.stdin.buffer.fileno()
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(stdin, zmq.POLLIN)
    pending: list[bytes] = []
    dropped = 0
    unnamed = 0  # request records whose constants never arrived
    last_export = time.monotonic()

    def export(all_of_it: bool) -> None:
        nonlocal pending, last_export, next_collect
        while pending and (all_of_it or len(pending) >= max_batch
                           or time.monotonic() - last_export >= schedule_s):
            batch, pending = pending[:max_batch], pending[max_batch:]
            sender.send(export_request(config.resource, config.scope, batch))
            last_export = time.monotonic()
        if not pending:
            last_export = time.monotonic()
        if last_export >= next_collect:
            gc.collect()
            next_collect = time.monotonic() + 10.0

    constants: dict[int, Constants] = {}

    def receive() -> None:
        nonlocal dropped, unnamed
        definitions, records = decoder.decode(pull.recv(copy=True))
        if len(constants) + len(definitions) > 8192:  # ids only grow: old ones are named no more
            constants.clear()
        for number, (name, attributes, variable) in definitions.items():
            if number not in constants:
                constants[number] = Constants(name, attributes, variable)
        for record in records:
            if len(pending) >= max_queue:  # the collector cannot keep up: drop, as the SDK does
                dropped += 1
                continue
            if type(record[0]) is int:  # a request
                const = constants.get(record[0])
                if const is None:  # its constants were pruned in the front-end before it was packed
                    unnamed += 1
                    continue
                pending.extend(request_spans(record, const, config.epoch_offset_ns))
            else:
                pending.extend(spans_of(record, config.epoch_offset_ns))

    open_ = True
    while open_:
        timeout_ms = max(0, int((last_export + schedule_s - time.monotonic()) * 1000)) if pending else None
        events = dict(poller.poll(timeout_ms))
        if pull in events:
            receive()
        if stdin in events and not os.read(stdin, 4096):
            open_ = False  # the front-end is done (or gone): take what is still on its way
            while pull.poll(100):
                receive()
        export(all_of_it=not open_)
    if dropped:
        log.warning("%d span records dropped: the collector did not keep up", dropped)
    if unnamed:
        log.warning("%d request records dropped: their span constants never arrived", unnamed)
    pull.close(linger=0)
    context.term()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    serve(msgspec.msgpack.decode(bytes.fromhex(sys.argv[1]), type=Config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
