"""The HTTP protocol the service runs under uvicorn: one write per response, nothing lost or
reordered on keep-alive, pipelined and closing connections."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from pathlib import Path

import h11
import httpx
import orjson

from service.server.http_protocol import _JoinedWrites
from service.settings import Settings
from tests.service.conftest import Server, TestModels, start_server

MAX_HEAD_BYTES = Settings().max_header_bytes


class _RecordingTransport(asyncio.Transport):
    """Stands in for the socket only to see where write boundaries fall, which a real peer cannot
    observe (the kernel may merge or split segments either way)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_writes_within_one_loop_turn_leave_as_one_and_close_sends_them_first():
    async def scenario():
        loop = asyncio.get_running_loop()
        raw = _RecordingTransport()
        t = _JoinedWrites(raw, loop)
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        t.write(b"ok")
        assert raw.writes == []  # not before the turn ends
        await asyncio.sleep(0)
        first = list(raw.writes)
        t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        t.close()  # uvicorn closes right after writing a `Connection: close` response
        assert t.is_closing()  # the rest is the transport's own
        await asyncio.sleep(0)
        return first, raw.writes

    first, writes = asyncio.run(scenario())
    assert first == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    assert writes == [*first, b"HTTP/1.1 204 No Content\r\n\r\n"]


def test_pipelined_requests_get_complete_responses_in_order_then_close(server: Server,
                                                                      test_models: TestModels):
    host, port = server.host_port.split(":")
    infer = orjson.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                      "data": [9] * 784}]})
    requests = [
        ("GET", "/v2/health/live", b""),
        ("POST", f"/v2/models/{test_models.image}/infer", infer),
        ("GET", f"/v2/models/{test_models.image}", b""),
        ("POST", f"/v2/models/{test_models.image}/infer", b"{not json"),
        ("POST", f"/v2/models/{test_models.image}/infer", infer),
    ]
    wire = b""
    for i, (method, target, body) in enumerate(requests):
        headers = [("host", host), ("content-length", str(len(body)))]
        if i == len(requests) - 1:
            headers.append(("connection", "close"))
        wire += f"{method} {target} HTTP/1.1\r\n".encode()
        wire += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n" + body

    received = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(wire)  # all five at once: the server answers them one after another
        while chunk := sock.recv(65536):
            received += chunk

    # h11 reads the responses; it needs each request (not its body) to know what answers it.
    parser = h11.Connection(h11.CLIENT)
    parser.receive_data(received)
    parser.receive_data(b"")  # and the server closed the connection
    responses = []
    for method, target, _ in requests:
        parser.send(h11.Request(method=method, target=target, headers=[("host", host)]))
        parser.send(h11.EndOfMessage())
        status, body = None, b""
        while not isinstance(event := parser.next_event(), h11.EndOfMessage):
            assert event is not h11.NEED_DATA, f"response {len(responses) + 1} is incomplete"
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
        responses.append((status, body))
        if parser.their_state is h11.MUST_CLOSE:
            break
        parser.start_next_cycle()
    assert isinstance(parser.next_event(), h11.ConnectionClosed)
    assert [s for s, _ in responses] == [200, 200, 200, 400, 200]
    _, first, meta, bad, last = (b for _, b in responses)
    assert orjson.loads(meta)["name"] == test_models.image
    assert orjson.loads(bad)["code"]
    assert orjson.loads(first)["outputs"] == orjson.loads(last)["outputs"]


def _send_head_slowly(host: str, port: int, head: bytes, piece: int = 16 * 1024) -> bytes:
    """Send `head` in pieces, stopping as soon as the server answers; return all it sent back."""
    with socket.create_connection((host, port), timeout=10) as sock:
        for i in range(0, len(head), piece):
            try:
                sock.sendall(head[i:i + piece])
            except OSError:  # the server answered and closed meanwhile
                break
            ready, _, _ = select.select([sock], [], [], 0.05)
            if ready:
                break
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # closed with our last piece unread: what it sent before is in `received`
    return received


def test_a_request_head_over_the_limit_gets_431_and_the_connection_closes(server: Server,
                                                                          test_models: TestModels):
    host, port = server.host_port.split(":")
    rejected = 'neuroserve_rejections_total{model="_unknown",reason="too_large"}'

    def rejections() -> float:
        lines = [x for x in httpx.get(f"{server.url}/metrics").text.splitlines() if x.startswith(rejected)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0  # absent until the first one

    before = rejections()
    # One header that never ends: without the limit the server keeps reading (and re-parsing) it.
    head = f"POST /v2/models/{test_models.image}/infer HTTP/1.1\r\nHost: {host}\r\nX-Big: ".encode()
    reply = _send_head_slowly(host, int(port), head + b"a" * (4 * MAX_HEAD_BYTES))
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large", reply[:200]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    assert orjson.loads(body)["code"] == "header_too_large"
    assert rejections() == before + 1


def test_heads_under_the_limit_and_large_bodies_are_served(server: Server, test_models: TestModels):
    host, port = server.host_port.split(":")
    infer = orjson.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                      "data": [9] * 784}]})
    # Headers adding up to just under the limit, arriving in small pieces (each read is counted).
    filler = "".join(f"X-Filler-{i}: {'b' * 1000}\r\n" for i in range(MAX_HEAD_BYTES // 1024 - 2))
    head = (f"POST /v2/models/{test_models.image}/infer HTTP/1.1\r\nHost: {host}\r\n{filler}"
            f"Content-Length: {len(infer)}\r\nConnection: close\r\n\r\n").encode()
    assert MAX_HEAD_BYTES - 4096 < len(head) <= MAX_HEAD_BYTES
    reply = _send_head_slowly(host, int(port), head + infer, piece=4096)
    assert reply.startswith(b"HTTP/1.1 200 OK"), reply[:200]
    # A body far larger than the limit, sent in one write with its head.
    big = orjson.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                    "data": [9] * 784}], "id": "x" * (4 * MAX_HEAD_BYTES)})
    r = httpx.post(f"{server.url}/v2/models/{test_models.image}/infer", content=big)
    assert r.status_code == 200, r.text


def _closes_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sends before closing `sock`, or None if it is still open after `seconds`."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    return received


def test_stalled_connections_get_408_or_are_closed_and_steady_ones_are_served(test_models: TestModels,
                                                                             tmp_path: Path):
    server = start_server(test_models.repository, tmp_path / "server.log", "--read-timeout-s", "2")
    host, port = server.host_port.split(":")
    infer = orjson.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                      "data": [9] * 784}]})
    head = f"POST /v2/models/{test_models.image}/infer HTTP/1.1\r\nHost: {host}\r\n"

    def connect() -> socket.socket:
        return socket.create_connection((host, int(port)), timeout=10)

    try:
        with connect() as silent, connect() as half_head, connect() as half_body, connect() as trickle:
            half_head.sendall(head.encode())
            half_body.sendall(f"{head}Content-Length: {len(infer)}\r\n\r\n".encode() + infer[:100])
            trickle.sendall(head.encode())
            start = time.monotonic()
            while time.monotonic() - start < 4:  # a header byte every 0.2 s never finishes the head
                try:
                    trickle.sendall(b"X")
                except OSError:
                    break
                time.sleep(0.2)
            assert _closes_within(silent, 8) == b""  # nothing to answer
            for sock, part in ((half_head, b"request line and headers"), (half_body, b"request body"),
                               (trickle, b"request line and headers")):
                reply = _closes_within(sock, 8)
                assert reply is not None and reply.startswith(b"HTTP/1.1 408 Request Timeout"), reply
                body = orjson.loads(reply.partition(b"\r\n\r\n")[2])
                assert body["code"] == "read_timeout" and part.decode() in body["error"]

        # Steady clients are served: requests 0.5 s apart on one connection, and a body sent in
        # pieces 0.5 s apart (a quarter of the timeout) that takes 2.5 s in all.
        with connect() as steady:
            for _ in range(4):
                steady.sendall(f"{head}Content-Length: {len(infer)}\r\n\r\n".encode() + infer)
                assert steady.recv(65536).startswith(b"HTTP/1.1 200 OK")
                time.sleep(0.5)
            steady.sendall(f"{head}Content-Length: {len(infer)}\r\nConnection: close\r\n\r\n".encode())
            for i in range(0, len(infer), len(infer) // 5 + 1):
                time.sleep(0.5)
                steady.sendall(infer[i:i + len(infer) // 5 + 1])
            reply = _closes_within(steady, 10)
            assert reply is not None and reply.startswith(b"HTTP/1.1 200 OK"), reply[:200]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'neuroserve_rejections_total{model="_unknown",reason="read_timeout"} 3.0' in metrics
    finally:
        server.stop()
