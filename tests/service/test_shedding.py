"""Over real HTTP: the expected-wait bound refuses what the queue could not start in time, and a key's
priority class is served before lower ones (service.core.batching)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from service.auth.keys import create_key, parse_scopes
from tests.service import models as m
from tests.service.servers import start_server

WIDTH = 1024


def _body(priority: int | None = None) -> bytes:
    doc: dict = {"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, WIDTH],
                             "data": np.zeros(WIDTH, np.float32)}]}
    if priority is not None:
        doc["parameters"] = {"priority": priority}
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def test_expected_wait_bound_refuses_with_retry_after_and_higher_priority_is_served_first(tmp_path: Path):
    repo = tmp_path / "models"
    # One row a batch (50-100 ms here), a queue of 64 rows but 1 s of expected wait at most.
    m.slow_model(repo, width=WIDTH, max_batch=1, delay_ms=0.0, queue=64, wait_ms=1000)
    keys = tmp_path / "keys.toml"
    low = create_key(keys, "batch-jobs", parse_scopes("infer"))
    high = create_key(keys, "interactive", parse_scopes("infer"), priority=2)
    server = start_server(repo, tmp_path / "server.log", "--api-keys-file", str(keys), "--providers", "cpu")
    url = f"{server.url}/v2/models/slow/infer"
    try:
        async def scenario():
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=30, limits=limits) as c:
                as_low = {"authorization": f"Bearer {low}"}
                as_high = {"authorization": f"Bearer {high}"}
                start = time.perf_counter()
                one = await c.post(url, content=_body(), headers=as_low)  # measures a row's compute time
                row_s = time.perf_counter() - start

                burst = await asyncio.gather(*(c.post(url, content=_body(), headers=as_low)
                                               for _ in range(60)))

                finished: list[str] = []

                async def send(who: str, headers: dict, body: bytes) -> httpx.Response:
                    r = await c.post(url, content=body, headers=headers)
                    finished.append(who)
                    return r

                lows = [asyncio.create_task(send("low", as_low, _body())) for _ in range(4)]
                await asyncio.sleep(0.01)
                # Asks for more than its key allows (5 > 2): served as class 2, still above the lows.
                highs = [asyncio.create_task(send("high", as_high, _body(priority=5))) for _ in range(2)]
                answers = await asyncio.gather(*lows, *highs)
                return one, row_s, burst, answers, finished

        one, row_s, burst, answers, finished = asyncio.run(scenario())
    finally:
        server.stop()
    assert one.status_code == 200
    codes = [r.status_code for r in burst]
    assert set(codes) == {200, 429}, codes
    refused = [r for r in burst if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert all(r.json()["code"] == "queue_full" for r in refused)
    # 60 rows never reach the 64-row bound: every refusal is the expected wait's.
    assert all("expected queue wait" in r.json()["error"] for r in refused)
    assert codes.count(200) < 40, (codes.count(200), row_s)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    # The two high-class requests, sent after the four lows, overtake the lows still queued.
    assert finished.index("high") < 4 and finished[-1] == "low", finished


def test_without_keys_a_full_queue_refuses_from_the_head_and_keeps_the_connection(tmp_path: Path):
    repo = tmp_path / "models"
    m.slow_model(repo, width=WIDTH, max_batch=1, delay_ms=0.0, queue=64, wait_ms=200)
    server = start_server(repo, tmp_path / "server.log", "--providers", "cpu")
    url = f"{server.url}/v2/models/slow/infer"
    try:
        async def scenario():
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=8)) as c:
                await c.post(url, content=_body())  # measures a row's compute time
                burst = await asyncio.gather(*(c.post(url, content=_body()) for _ in range(40)))
                metrics = (await c.get(f"{server.url}/metrics")).text
                return burst, metrics

        burst, metrics = asyncio.run(scenario())
    finally:
        server.stop()
    refused = [r for r in burst if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in burst)
    # Refused by the HTTP protocol: no ASGI app ran (it would have added Server-Timing).
    head = [r for r in refused if "server-timing" not in r.headers]
    assert head, "no refusal from the head"
    for r in head:
        assert int(r.headers["retry-after"]) >= 1 and r.headers["x-request-id"]
        assert r.json()["code"] == "queue_full" and "connection" not in r.headers  # kept alive
    assert f'neuroserve_rejections_total{{model="slow",reason="queue_full"}} {len(refused)}.0' in metrics


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from `sock`; bytes after it stay in `buffer`."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole head: {bytes(buffer)!r}")
        buffer += chunk
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    end = len(head) + 4 + int(headers["content-length"])
    while len(buffer) < end:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a whole body")
        buffer += chunk
    body = bytes(buffer[len(head) + 4:end])
    del buffer[:end]
    return int(lines[0].split()[1]), headers, body


BUSY_WIDTH = 3072
BUSY_PATH = "/v2/models/slow/infer"
BUSY_BODY = orjson.dumps({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, BUSY_WIDTH],
                                      "data": [0.0] * BUSY_WIDTH}]})
BUSY_REQUEST = (f"POST {BUSY_PATH} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(BUSY_BODY)}\r\n\r\n").encode() + BUSY_BODY


def _while_busy(tmp_path: Path, client: Callable[[tuple[str, int], threading.Event], None],
                *args: str) -> tuple[list[int], str]:
    """Serve one model whose row takes most of a second to compute (server options `args`): once
    one row was measured, a request arriving while another computes expects to wait that long, over
    its 100 ms bound, and is refused. Run `client(address, finished)` in a thread once a row
    computes; `finished` is set when that row's request is answered. The statuses of the measuring
    and the computing requests, and the server's metrics at the end."""
    repo = tmp_path / "models"
    m.slow_model(repo, width=BUSY_WIDTH, max_batch=1, delay_ms=0.0, queue=8, wait_ms=100)
    server = start_server(repo, tmp_path / "server.log", "--providers", "cpu", *args)
    host, port = server.host_port.split(":")
    computing, finished = threading.Event(), threading.Event()

    def run() -> None:
        computing.wait(30)
        client((host, int(port)), finished)

    async def hold() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as c:
            measured = await c.post(f"{server.url}{BUSY_PATH}", content=BUSY_BODY)
            busy = asyncio.create_task(c.post(f"{server.url}{BUSY_PATH}", content=BUSY_BODY))
            await asyncio.sleep(0.1)
            computing.set()
            status = (await busy).status_code
            finished.set()
            return [measured.status_code, status]

    thread = threading.Thread(target=run)
    thread.start()
    try:
        statuses = asyncio.run(hold())
        thread.join(timeout=60)
        return statuses, httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()


def test_refusals_from_the_head_keep_the_framing_of_every_way_a_request_arrives(tmp_path: Path):
    """While a model's queue refuses, V2 requests are refused from their heads however their bytes
    arrive (whole in one write, two in one write, split in two, asking to close, or malformed),
    each counted once, and the request being computed is answered."""
    request = BUSY_REQUEST
    refused: list[tuple[int, dict[str, str], bytes]] = []

    def probe(address: tuple[str, int], _: threading.Event) -> None:
        with socket.create_connection(address, timeout=30) as sock:
            buffer = bytearray()
            sock.sendall(request)  # whole, in one write
            refused.append(_read_response(sock, buffer))
            sock.sendall(request + request)  # two in one write
            refused.append(_read_response(sock, buffer))
            refused.append(_read_response(sock, buffer))
            sock.sendall(request[:40])  # split inside the head
            time.sleep(0.05)
            sock.sendall(request[40:])
            refused.append(_read_response(sock, buffer))
            split = request.index(b"\r\n\r\n") + 100
            sock.sendall(request[:split])  # split inside the body
            time.sleep(0.05)
            sock.sendall(request[split:])
            refused.append(_read_response(sock, buffer))
        with socket.create_connection(address, timeout=30) as sock:
            buffer = bytearray()
            sock.sendall(request.replace(b"Host: t\r\n", b"Host: t\r\nConnection: close\r\n"))
            refused.append(_read_response(sock, buffer))
            assert sock.recv(1) == b""  # closed, as the client asked
        with socket.create_connection(address, timeout=30) as sock:
            buffer = bytearray()
            sock.sendall(request.replace(b"Host: t\r\n", b"Host t\r\n"))  # whole, malformed
            refused.append(_read_response(sock, buffer))
            assert sock.recv(1) == b""  # closed after the 400

    statuses, metrics = _while_busy(tmp_path, probe)
    assert statuses == [200, 200]  # nothing accepted is lost
    codes = [status for status, _, _ in refused]
    assert codes == [429, 429, 429, 429, 429, 429, 400], codes
    for _, headers, reply in refused[:5]:
        assert orjson.loads(reply)["code"] == "queue_full"
        assert int(headers["retry-after"]) >= 1 and headers["x-request-id"]
        assert "connection" not in headers  # kept alive
    assert orjson.loads(refused[6][2])["code"] == "bad_request" and refused[6][1]["x-request-id"]
    assert 'neuroserve_rejections_total{model="slow",reason="queue_full"} 6.0' in metrics
    counted = [line for line in metrics.splitlines()
               if line.startswith("neuroserve_request_duration_seconds_count{") and 'model="slow"' in line
               and 'code="429"' in line]
    assert len(counted) == 1 and counted[0].endswith(" 6.0"), counted


def test_a_connection_refused_whole_is_kept_alive_from_its_last_answer(tmp_path: Path):
    """A request refused whole does not re-arm the keep-alive timer; the timer, when it fires,
    counts from the connection's last answer: still open past the deadline the answer before set,
    closed once idle for --keep-alive-s."""
    probe = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n"
    seen: dict[str, object] = {}

    def client(address: tuple[str, int], _: threading.Event) -> None:
        with socket.create_connection(address, timeout=30) as sock:
            buffer = bytearray()
            sock.sendall(probe)  # answered: the keep-alive timer is armed for 1 s from now
            seen["first"] = _read_response(sock, buffer)[0]
            time.sleep(0.3)
            sock.sendall(BUSY_REQUEST)  # refused whole while the row computes
            seen["refused"] = _read_response(sock, buffer)[0]
            time.sleep(0.9)  # past the first answer's deadline, 0.9 s after the refusal
            sock.sendall(probe)
            seen["after_deadline"] = _read_response(sock, buffer)[0]
            answered = time.monotonic()
            sock.settimeout(5)
            seen["closed"] = sock.recv(1) == b""
            seen["idle_s"] = time.monotonic() - answered

    statuses, _ = _while_busy(tmp_path, client, "--keep-alive-s", "1")
    assert statuses == [200, 200]
    assert seen["first"] == 200 and seen["refused"] == 429 and seen["after_deadline"] == 200, seen
    assert seen["closed"] and 0.8 <= seen["idle_s"] <= 2.5, seen


def test_with_several_workers_a_worker_refuses_from_heads_on_the_executors_word(tmp_path: Path):
    """With --workers 2 the queue is in the executor process. A request it refuses tells the worker
    for how long the queue refuses; the worker's next request is refused from its head (no route
    ran: no Server-Timing), and once the queue has room requests reach it again."""
    answers: list[tuple[int, dict[str, str], bytes]] = []

    def client(address: tuple[str, int], finished: threading.Event) -> None:
        with socket.create_connection(address, timeout=30) as sock:
            buffer = bytearray()
            for _ in range(3):  # refused by the executor, then by this worker from the head
                sock.sendall(BUSY_REQUEST)
                answers.append(_read_response(sock, buffer))
            finished.wait(30)
            time.sleep(0.2)  # the queue is empty, the worker's hold has lapsed
            sock.sendall(BUSY_REQUEST)
            answers.append(_read_response(sock, buffer))

    statuses, _ = _while_busy(tmp_path, client, "--workers", "2")
    assert statuses == [200, 200]
    codes = [status for status, _, _ in answers]
    assert codes == [429, 429, 429, 200], codes
    assert "server-timing" in answers[0][1]  # the executor refused it, through the route
    for _, headers, reply in answers[1:3]:  # the worker refused them from their heads
        assert "server-timing" not in headers and int(headers["retry-after"]) >= 1
        assert orjson.loads(reply)["code"] == "queue_full"


@pytest.mark.parametrize("workers", [1, 2])
def test_answers_slower_than_the_bound_lower_it_and_slow_uploads_do_not(tmp_path: Path, workers: int):
    """Each answer's time from the whole request to its answer, its compute aside, is fed back to
    the model's queue (in the executor process with several workers). A batch held for more rows
    (`max_queue_delay_ms` 300 while more requests are expected) makes answers slower than the
    100 ms bound, and the queue lowers its bound; a body that trickles in for 300 ms does not: an
    upload is the client's time, which admitting fewer would not save."""
    repo = tmp_path / "models"
    width = 256
    m.slow_model(repo, width=width, max_batch=4, delay_ms=300.0, queue=64, wait_ms=100)
    server = start_server(repo, tmp_path / "server.log", "--providers", "cpu", "--workers", str(workers))
    host, port = server.host_port.split(":")
    url = f"{server.url}/v2/models/slow/infer"
    body = orjson.dumps({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, width],
                                     "data": [0.0] * width}]})
    head = (f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()

    async def held_batches(c: httpx.AsyncClient) -> list[int]:
        """Eight at once (the recent peak), then three: their batch waits for the five expected."""
        await asyncio.gather(*(c.post(url, content=body) for _ in range(8)))
        return [r.status_code for r in await asyncio.gather(*(c.post(url, content=body) for _ in range(3)))]

    async def rounds() -> list[int]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=16)) as c:
            return [code for _ in range(3) for code in await held_batches(c)]

    try:
        first = httpx.post(url, content=body, timeout=30)
        untouched = _gauge(httpx.get(f"{server.url}/metrics").text)
        uploads = []
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(head)
                time.sleep(0.3)
                sock.sendall(body)
                uploads.append(_read_response(sock, bytearray())[0])
        after_uploads = _gauge(httpx.get(f"{server.url}/metrics").text)
        held = asyncio.run(rounds())
        lowered = _gauge(httpx.get(f"{server.url}/metrics").text)
    finally:
        server.stop()
    assert first.status_code == 200 and uploads == [200] * 3
    # A request may find the held batch's oldest over the bound and be refused (429), not more.
    assert set(held) <= {200, 429} and held.count(200) >= 6, held
    assert untouched == 0.1 and after_uploads == 0.1
    # Each answer held 300 ms lowers the bound by about 1 ms; the gauge is set when a batch ends,
    # before its own answers are fed back, so the last held batch may not show yet.
    assert 0.05 <= lowered <= 0.1 - 0.0009 * (held.count(200) - 3), (lowered, held)


def _gauge(metrics: str) -> float:
    """The slow model's `neuroserve_queue_wait_bound_seconds`."""
    line = next(ln for ln in metrics.splitlines()
                if ln.startswith('neuroserve_queue_wait_bound_seconds{') and 'model="slow"' in ln)
    return float(line.rsplit(" ", 1)[1])
