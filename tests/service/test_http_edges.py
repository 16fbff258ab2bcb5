"""The edges of reading a request: every byte of a head counts toward its limit, malformed framing
gets the JSON error, a large V2 body is judged by what it declares before it is read, and every 503
says when to come back."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import orjson

from service.settings import Settings
from tests.service.conftest import Server, TestModels, with_app

MAX_HEAD_BYTES = Settings().max_header_bytes


def _exchange(server: Server, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` in one write and read until the server closes."""
    host, port = server.host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # the server may answer and close before taking it all
            s.sendall(data)
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass  # closed with unread data still queued: the answer came before
    return reply


def _parse(reply: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    return status, headers, body


def test_a_head_over_the_limit_in_one_write_gets_431(server: Server):
    for size in (MAX_HEAD_BYTES + 5_000, 200_000):  # 70 KB and 200 KB, each one write
        head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
        status, headers, body = _parse(_exchange(server, head))
        assert status == b"HTTP/1.1 431 Request Header Fields Too Large", (size, status)
        assert orjson.loads(body)["code"] == "header_too_large"
        assert headers[b"x-request-id"] and headers[b"connection"] == b"close"
    # many headers, each small, in one write
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(MAX_HEAD_BYTES // 100)) + b"\r\n"
    assert _parse(_exchange(server, head))[0].startswith(b"HTTP/1.1 431 ")
    # just under the limit is served
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " \
        + b"a" * (MAX_HEAD_BYTES - 200) + b"\r\n\r\n"
    assert _parse(_exchange(server, head))[0] == b"HTTP/1.1 200 OK"


def test_malformed_framing_gets_a_json_400_with_a_request_id(server: Server):
    for request in (b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                    b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                    b"Content-Length: 2\r\n\r\nab",
                    b"garbage\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
        status, headers, body = _parse(_exchange(server, request))
        assert status == b"HTTP/1.1 400 Bad Request", (request, status)
        assert headers[b"content-type"] == b"application/json"
        assert headers[b"x-request-id"]
        assert orjson.loads(body)["code"] == "bad_request"


def test_a_large_v2_body_over_the_limits_is_refused_from_its_declared_shape(server: Server,
                                                                            test_models: TestModels):
    rows = 40_000  # ~31 MB of JSON, within --max-body-bytes, far over max_batch_size
    body = b'{"inputs":[{"name":"pixels","datatype":"UINT8","shape":[%d,1,28,28],"data":[' % rows \
        + b",".join([b"0"] * (rows * 784 // 2)) + b"]}]}"
    request = (f"POST /v2/models/{test_models.image}/infer HTTP/1.1\r\nHost: x\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    probes: list[float] = []
    stop, probing = threading.Event(), threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=server.url) as c:
            while not stop.is_set():
                start = time.perf_counter()
                assert c.get("/v2/health/live").status_code == 200
                probes.append(time.perf_counter() - start)
                probing.set()
                time.sleep(0.005)

    prober = threading.Thread(target=probe)
    prober.start()
    assert probing.wait(30)  # connected and probing before the bodies go out
    try:
        answers = []
        senders = [threading.Thread(target=lambda: answers.append(_exchange(server, request + body)))
                   for _ in range(4)]
        start = time.perf_counter()
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        prober.join()
    for reply in answers:
        status, headers, payload = _parse(reply)
        assert status == b"HTTP/1.1 400 Bad Request"
        assert b"max_batch_size" in orjson.loads(payload)["error"].encode()
        assert headers[b"connection"] == b"close"  # the rest of the body is not read
    assert elapsed < 2.0
    assert max(probes) < 0.25, f"live took {max(probes) * 1000:.0f} ms while the bodies arrived"


def test_every_503_says_when_to_retry(test_models: TestModels):
    async def scenario(c: httpx.AsyncClient) -> list[tuple[int, str | None]]:
        await c.post(f"/v2/repository/models/{test_models.image}/unload")
        body = orjson.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                         "data": [0] * 784}]})
        answers = [await c.post(f"/v2/models/{test_models.image}/infer", content=body),
                   await c.get(f"/v2/models/{test_models.image}/ready")]
        return [(r.status_code, r.headers.get("retry-after")) for r in answers]

    assert with_app(test_models.repository, scenario) == [(503, "1"), (503, "1")]
