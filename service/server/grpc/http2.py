"""HTTP/2 for the gRPC server, spoken on the event loop (RFC 9113, the server side and the parts
gRPC uses: no server push, no priorities).

Why not grpcio's asyncio server: it runs HTTP/2 in gRPC core's own threads and hands every event of
every call between its poller thread and the event loop, which cost more CPU per inference than the
inference path itself (docs/benchmarks.md, "V2 over gRPC and over HTTP"). Here the frames are cut
from the bytes uvloop hands over, in the loop that runs the servicers, and the answers written
back in one `write` each. Header blocks are decoded with `hpack` (python-hyper's HPACK, as `h2`
uses it); answers are encoded as literals that never touch the peer's dynamic table, so nothing
about them needs remembering.

A `Connection` parses frames, keeps the flow-control windows and the streams, and hands a stream's
header fields, data and end to the object `opener` returned for it (a `service.server.grpc.calls`
call). Errors of the peer's framing end the connection with GOAWAY; errors of one stream, with
RST_STREAM.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Iterable
from time import monotonic
from typing import Protocol

import hpack
from hpack.exceptions import HPACKError

from service.observability import metrics

log = logging.getLogger("neuroserve.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
(DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE,
 CONTINUATION) = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 11
ERROR_NAMES = {NO_ERROR: "no_error", PROTOCOL_ERROR: "protocol_error", INTERNAL_ERROR: "internal_error",
               FLOW_CONTROL_ERROR: "flow_control_error", FRAME_SIZE_ERROR: "frame_size_error",
               COMPRESSION_ERROR: "compression_error", ENHANCE_YOUR_CALM: "enhance_your_calm"}
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE = 1, 3, 4
SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 5, 6

DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384
MAX_WINDOW = 2**31 - 1
# What a peer may send before we read: large enough that a big tensor streams in without waiting
# for a WINDOW_UPDATE round trip every 64 KiB; each is topped up once half of it is used.
STREAM_WINDOW = 1 << 22
CONNECTION_WINDOW = 1 << 24
# The largest frame we accept: fewer, larger DATA frames for large tensors, fewer turns of the parser.
MAX_FRAME = 1 << 20
KNOWN_BLOCKS = 64  # header blocks remembered per connection (`Connection._decode`)
MAX_STREAMS = 1024  # concurrent streams per connection (grpc clients queue calls beyond it)
# PING, SETTINGS and RST_STREAM frames a connection may send in a second. Each costs us work and
# answers nothing; clients send a few a second (keep-alive, flow-control probes, a cancel). A flood
# of them — "rapid reset" (CVE-2023-44487) is one — ends the connection.
MAX_CONTROL_FRAMES_PER_S = 1000

_FRAME = struct.Struct(">HBBBL")  # length (24 bits, split 16 + 8), type, flags, stream id
_SETTING = struct.Struct(">HL")
_WORD = struct.Struct(">L")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, kind, flags, stream_id) + payload


def _integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK's integer with an N-bit prefix (RFC 7541 section 5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """One header field as a literal without indexing, new name, no Huffman coding."""
    return b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value


def header_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(literal(name, value) for name, value in fields)


STATUS_200 = b"\x88"  # `:status: 200`, entry 8 of HPACK's static table


class StreamHandler(Protocol):
    """What a `Connection` tells the owner of a stream (a gRPC call)."""

    def received(self, data: bytes) -> None: ...
    def ended(self) -> None: ...
    def reset(self) -> None: ...


class Pieces:
    """The start of a unit (a frame, a message) whose end has not arrived yet. Later pieces are
    appended in place, so a unit that arrives in many reads is copied once, not once per read."""

    __slots__ = ("held", "needed")

    def __init__(self) -> None:
        self.held = bytearray()
        self.needed = 0  # how long `held` must grow to hold the whole unit

    def join(self, data: bytes) -> bytes | None:
        """What is held followed by `data`; None while that is still shorter than `needed`."""
        if not self.held:
            return data
        self.held += data
        if len(self.held) < self.needed:
            return None
        whole = bytes(self.held)
        self.held = bytearray()
        return whole

    def hold(self, rest: bytes, needed: int) -> None:
        self.held, self.needed = bytearray(rest), needed

    def __bool__(self) -> bool:
        return bool(self.held)


class Stream:
    """One request/response exchange: its flow-control windows and what waits for them."""

    __slots__ = (
        "done",
        "handler",
        "id",
        "pending",
        "pending_trailers",
        "remote_closed",
        "send_window",
        "unacked",
    )

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.handler: StreamHandler | None = None
        self.send_window = send_window
        self.unacked = 0  # data consumed since our last WINDOW_UPDATE for this stream
        self.remote_closed = False
        self.pending: bytes | memoryview = b""  # data the peer's windows do not yet let us send
        self.pending_trailers: bytes | None = None
        self.done = False  # our END_STREAM is sent or queued


Opener = Callable[["Connection", Stream, list[tuple[bytes, bytes]]], StreamHandler]


class Connection(asyncio.Protocol):
    """One client connection: frames in, streams opened through `opener`, frames out."""

    def __init__(self, opener: Opener, max_header_bytes: int, on_change: Callable[[Connection, bool], None],
                 max_age_s: float = 0.0) -> None:
        self.opener = opener
        self.max_age_s = max_age_s
        self.on_change = on_change  # (self, True) once made, (self, False) once lost
        self.max_header_bytes = max_header_bytes
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.pieces = Pieces()  # a frame begun in an earlier read
        self.preface_seen = False
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = max_header_bytes
        self.table_epoch = 0  # changes whenever a header block changes the decoder's dynamic table
        self.blocks: dict[bytes, tuple[int, list[tuple[bytes, bytes]]]] = {}  # see `_decode`
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME
        self.unacked = 0  # data received since our last connection-level WINDOW_UPDATE
        self.continuing: tuple[int, int, bytearray] | None = None  # a header block awaiting CONTINUATION
        self.going_away = False
        self.closed = False
        self.control_since, self.control_frames = 0.0, 0  # see `_calm`
        self.aging: asyncio.TimerHandle | None = None  # the GOAWAY at `max_age_s`
        self.outbox: list[bytes] = []  # frames written at the end of this turn of the loop (`_write`)

    # -- asyncio ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        self.on_change(self, True)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            family = "ipv6" if ":" in str(peer[0]) else "ipv4"
            self.peer = f"{family}:[{peer[0]}]:{peer[1]}" if family == "ipv6" else f"ipv4:{peer[0]}:{peer[1]}"
        settings = b"".join(_SETTING.pack(k, v) for k, v in (
            (SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS), (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (SETTINGS_MAX_FRAME_SIZE, MAX_FRAME), (SETTINGS_MAX_HEADER_LIST_SIZE, self.max_header_bytes)))
        transport.write(frame(SETTINGS, 0, 0, settings)
                        + frame(WINDOW_UPDATE, 0, 0, _WORD.pack(CONNECTION_WINDOW - DEFAULT_WINDOW)))
        if self.max_age_s:
            self.aging = asyncio.get_running_loop().call_later(self.max_age_s, self.go_away)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.aging is not None:
            self.aging.cancel()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            if stream.handler is not None:
                stream.handler.reset()
        self.on_change(self, False)

    def pause_writing(self) -> None:
        # A peer that does not read what we write (answers, PING and SETTINGS acknowledgements)
        # is not read either until it has caught up: what waits for it stays bounded.
        self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if not self.closed:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        joined = self.pieces.join(data)
        if joined is None:
            return
        buf = joined
        if not self.preface_seen:
            if not buf.startswith(PREFACE):
                if len(buf) >= len(PREFACE) or not PREFACE.startswith(buf):
                    self._fail(PROTOCOL_ERROR, "not HTTP/2")
                    return
                self.pieces.hold(buf, len(PREFACE))
                return
            self.preface_seen = True
            buf = buf[len(PREFACE):]
        pos, n = 0, len(buf)
        unpack = _FRAME.unpack_from
        while not self.closed:
            if n - pos < 9:
                self.pieces.hold(buf[pos:], 9)
                break
            high, low, kind, flags, stream_id = unpack(buf, pos)
            length = high << 8 | low
            if length > MAX_FRAME:
                self._fail(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                return
            end = pos + 9 + length
            if end > n:
                self.pieces.hold(buf[pos:], 9 + length)
                break
            payload = buf[pos + 9:end]
            pos = end
            stream_id &= 0x7FFFFFFF
            if self.continuing is not None and kind != CONTINUATION:
                self._fail(PROTOCOL_ERROR, "header block interrupted")
                return
            if kind == DATA:
                self._data(stream_id, flags, payload)
            elif kind == HEADERS:
                self._headers(stream_id, flags, payload)
            elif kind == WINDOW_UPDATE:
                self._window_update(stream_id, payload)
            elif kind == SETTINGS:
                if self._calm():
                    self._settings(flags, payload)
            elif kind == PING:
                if not flags & ACK and self._calm():
                    self._write(frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                if not self._calm():
                    return
                stream = self.streams.pop(stream_id, None)
                if stream is not None and stream.handler is not None:
                    stream.handler.reset()
            elif kind == CONTINUATION:
                self._continuation(stream_id, flags, payload)
            elif kind == GOAWAY:
                self.going_away = True
                if not self.streams:
                    self.close()
            elif kind == PUSH_PROMISE:
                self._fail(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # PRIORITY and unknown frame types are ignored, as RFC 9113 asks.

    # -- frames from the peer -----------------------------------------------------------------------

    def _data(self, stream_id: int, flags: int, payload: bytes) -> None:
        self.unacked += len(payload)
        if self.unacked >= CONNECTION_WINDOW // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, _WORD.pack(self.unacked)))
            self.unacked = 0
        if flags & PADDED:
            payload = _unpad(payload)
            if payload is None:
                self._fail(PROTOCOL_ERROR, "bad padding")
                return
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id == 0 or stream_id > self.last_stream_id:
                self._fail(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream we reset or finished: its late data only counts against the window
        if payload and stream.handler is not None:
            stream.handler.received(payload)
        if flags & END_STREAM:
            self._remote_end(stream)

    def _headers(self, stream_id: int, flags: int, payload: bytes) -> None:
        if flags & PADDED:
            unpadded = _unpad(payload)
            if unpadded is None:
                self._fail(PROTOCOL_ERROR, "bad padding")
                return
            payload = unpadded
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if not flags & END_HEADERS:
            self.continuing = (stream_id, flags, bytearray(payload))
            return
        self._header_block(stream_id, flags, payload)

    def _continuation(self, stream_id: int, flags: int, payload: bytes) -> None:
        if self.continuing is None or self.continuing[0] != stream_id:
            self._fail(PROTOCOL_ERROR, "unexpected CONTINUATION")
            return
        block = self.continuing[2]
        block += payload
        if len(block) > self.max_header_bytes:
            self._fail(PROTOCOL_ERROR, "header block over the limit")
            return
        if flags & END_HEADERS:
            first_flags = self.continuing[1]
            self.continuing = None
            self._header_block(stream_id, first_flags, bytes(block))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        fields = self._decode(block)  # even for a stream refused below: the table must follow the peer's
        if fields is None:
            return
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers: gRPC clients send none, but they end the stream
            if flags & END_STREAM:
                self._remote_end(stream)
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream_id:
            self._fail(PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
            return
        self.last_stream_id = stream_id
        if self.going_away or len(self.streams) >= MAX_STREAMS:
            self._write(frame(RST_STREAM, 0, stream_id, _WORD.pack(REFUSED_STREAM)))
            return
        stream = Stream(stream_id, self.peer_initial_window)
        # Known before the call may answer (at once, if it fails): a request that has ended needs
        # no RST_STREAM after its answer.
        stream.remote_closed = bool(flags & END_STREAM)
        self.streams[stream_id] = stream
        stream.handler = self.opener(self, stream, fields)
        if flags & END_STREAM:
            self._remote_end(stream)

    def _calm(self) -> bool:
        """Count a control frame; False (and the connection ended) when they come too fast."""
        now = monotonic()
        if now - self.control_since >= 1.0:
            self.control_since, self.control_frames = now, 0
        self.control_frames += 1
        if self.control_frames > MAX_CONTROL_FRAMES_PER_S:
            self._fail(ENHANCE_YOUR_CALM, "too many control frames")
            return False
        return True

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]] | None:
        """The fields of a header block. A client sends the same block for call after call (every
        field a reference to its dynamic table); while that table is unchanged the same bytes mean
        the same fields, so a block that changed nothing is remembered with the table's epoch."""
        known = self.blocks.get(block)
        if known is not None and known[0] == self.table_epoch:
            return known[1]
        table = self.decoder.header_table
        entries = table.dynamic_entries
        first, size = entries[0] if entries else None, table.maxsize
        try:
            fields = self.decoder.decode(block, raw=True)
        except HPACKError as e:
            self._fail(COMPRESSION_ERROR, f"header block: {e}")
            return None
        # An insertion puts a new entry first (`first` is still referenced, so it cannot be that one).
        if (entries[0] if entries else None) is not first or table.maxsize != size:
            self.table_epoch += 1
        else:
            if len(self.blocks) >= KNOWN_BLOCKS:
                self.blocks.clear()
            self.blocks[block] = (self.table_epoch, fields)
        return fields

    def _remote_end(self, stream: Stream) -> None:
        stream.remote_closed = True
        if stream.done and not stream.pending and stream.pending_trailers is None:
            self.streams.pop(stream.id, None)
        if stream.handler is not None:
            stream.handler.ended()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE")
            return
        increment = _WORD.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                self._fail(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
                return
            self._flush_waiting()
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.send_window += increment
            if stream.pending or stream.pending_trailers is not None:
                self._flush(stream)

    def _settings(self, flags: int, payload: bytes) -> None:
        if flags & ACK:
            return
        if len(payload) % 6:
            self._fail(FRAME_SIZE_ERROR, "SETTINGS")
            return
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    self._fail(FLOW_CONTROL_ERROR, "initial window over 2^31-1")
                    return
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= 2**24 - 1:
                    self._fail(PROTOCOL_ERROR, "max frame size")
                    return
                self.peer_max_frame = value
            # The header table size the peer's decoder allows does not matter: we never index.
        self._write(frame(SETTINGS, ACK, 0))
        self._flush_waiting()

    # -- to the peer --------------------------------------------------------------------------------

    def consumed(self, stream: Stream, n: int) -> None:
        """The owner of `stream` has taken `n` bytes of its data: the peer may send as many more."""
        stream.unacked += n
        if stream.unacked >= STREAM_WINDOW // 2 and not stream.remote_closed and not self.closed:
            self._write(frame(WINDOW_UPDATE, 0, stream.id, _WORD.pack(stream.unacked)))
            stream.unacked = 0

    def send(self, stream: Stream, headers: bytes | None, data: bytes, trailers: bytes | None) -> None:
        """Write, in this order and in one write, a header block, data (within the peer's windows;
        what does not fit waits for its WINDOW_UPDATE) and a trailer block ending the stream."""
        if self.closed or stream.done:
            return
        out: list[bytes] = []
        if headers is not None:
            out.append(self._header_frames(stream.id, 0, headers))
        if data:
            if stream.pending:
                stream.pending = memoryview(bytes(stream.pending) + data)
            else:
                self._data_frames(stream, data, out)
        if trailers is not None:
            stream.done = True
            if stream.pending:
                stream.pending_trailers = trailers
            else:
                out.append(self._header_frames(stream.id, END_STREAM, trailers))
                self._finished(stream, out)
        if out:
            self._write(b"".join(out))

    def reset(self, stream: Stream, code: int = CANCEL) -> None:
        """End `stream` at once (RST_STREAM): our side has given up on it."""
        stream.done = True
        self.streams.pop(stream.id, None)
        if not self.closed:
            self._write(frame(RST_STREAM, 0, stream.id, _WORD.pack(code)))

    def go_away(self) -> None:
        """Refuse new streams and close once those open have finished (a graceful shutdown)."""
        if self.closed or self.going_away or self.transport is None:
            return
        self.going_away = True
        self._write(self._goaway(NO_ERROR))
        if not self.streams:
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self._flush_outbox()
            self.transport.close()

    def _write(self, data: bytes) -> None:
        """Queue `data` for one write at the end of this turn of the event loop: the answers of a
        batch, finished together, leave in one system call per connection, not one each."""
        if self.closed:
            return
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self._flush_outbox)
        self.outbox.append(data)

    def _flush_outbox(self) -> None:
        if self.outbox and not self.closed:
            data = b"".join(self.outbox) if len(self.outbox) > 1 else self.outbox[0]
            self.outbox.clear()
            self.transport.write(data)  # type: ignore[union-attr]

    def _finished(self, stream: Stream, out: list[bytes]) -> None:
        """Our END_STREAM is on its way; if the peer is still sending, tell it to stop (RFC 9113
        8.1: a complete response may end a request early with RST_STREAM NO_ERROR)."""
        if not stream.remote_closed:
            out.append(frame(RST_STREAM, 0, stream.id, _WORD.pack(NO_ERROR)))
        self.streams.pop(stream.id, None)
        if self.going_away and not self.streams:
            asyncio.get_running_loop().call_soon(self.close)

    def _header_frames(self, stream_id: int, flags: int, block: bytes) -> bytes:
        limit = self.peer_max_frame
        if len(block) <= limit:
            return frame(HEADERS, flags | END_HEADERS, stream_id, block)
        parts = [frame(HEADERS, flags, stream_id, block[:limit])]
        for offset in range(limit, len(block), limit):
            last = offset + limit >= len(block)
            piece = block[offset:offset + limit]
            parts.append(frame(CONTINUATION, END_HEADERS if last else 0, stream_id, piece))
        return b"".join(parts)

    def _data_frames(self, stream: Stream, data: bytes | memoryview, out: list[bytes]) -> None:
        """Frames for as much of `data` as the windows allow; the rest waits in `stream.pending`
        (a view: a large answer sent window by window is not copied each time)."""
        allowed = max(0, min(self.send_window, stream.send_window, len(data)))
        if allowed:
            limit = self.peer_max_frame
            if allowed == len(data) <= limit:
                out.append(frame(DATA, 0, stream.id, bytes(data)))
            else:
                view = memoryview(data)
                for offset in range(0, allowed, limit):
                    out.append(frame(DATA, 0, stream.id, bytes(view[offset:min(offset + limit, allowed)])))
            self.send_window -= allowed
            stream.send_window -= allowed
        stream.pending = memoryview(data)[allowed:] if allowed < len(data) else b""

    def _flush_waiting(self) -> None:
        """Send what streams hold back, now that a window has grown."""
        for stream in [s for s in self.streams.values() if s.pending or s.pending_trailers is not None]:
            if self.send_window <= 0:
                break
            self._flush(stream)

    def _flush(self, stream: Stream) -> None:
        out: list[bytes] = []
        data, stream.pending = stream.pending, b""
        self._data_frames(stream, data, out)
        if not stream.pending and stream.pending_trailers is not None:
            out.append(self._header_frames(stream.id, END_STREAM, stream.pending_trailers))
            stream.pending_trailers = None
            self._finished(stream, out)
        if out:
            self._write(b"".join(out))

    def _fail(self, code: int, why: str) -> None:
        """A connection error: GOAWAY with `code`, then close."""
        log.info("gRPC connection closed: %s", why, extra={"peer": self.peer})
        if self.transport is not None and not self.closed:
            self._flush_outbox()
            self.transport.write(self._goaway(code, why.encode()[:200]))
            self.transport.close()
        self.closed = True


    def _goaway(self, code: int, debug: bytes = b"") -> bytes:
        metrics.GRPC_GOAWAYS.labels(ERROR_NAMES[code]).inc()
        return frame(GOAWAY, 0, 0, _WORD.pack(self.last_stream_id) + _WORD.pack(code) + debug)


def _unpad(payload: bytes) -> bytes | None:
    if not payload or payload[0] >= len(payload):
        return None
    return payload[1:len(payload) - payload[0]]
