"""SIGTERM under load: the server turns not-ready, keeps serving through --drain-grace-s with
`Connection: close`, then stops taking connections; no request that was fully sent goes unanswered.
A worker killed under load loses only the requests it held, and is replaced."""

from __future__ import annotations

import collections
import contextlib
import http.client
import os
import signal
import threading
import time
from pathlib import Path

import orjson
import pytest

from tests.service.conftest import TestModels, start_server

CLIENTS = 16


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_leaves_no_sent_request_unanswered(test_models: TestModels, tmp_path,
                                                              workers: int):
    server = start_server(test_models.repository, tmp_path / "server.log", "--drain-grace-s", "1",
                          "--workers", str(workers))
    host, port = server.host_port.split(":")
    body = orjson.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                     "data": [0] * 784}]})
    outcomes: collections.Counter[str] = collections.Counter()
    closed_by_server: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        conn = None
        while not stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(host, int(port), timeout=15)
                try:
                    conn.connect()
                except OSError:  # refused, or a dropped SYN that then met a closed port
                    with lock:
                        outcomes["refused"] += 1
                    conn = None
                    time.sleep(0.01)
                    continue
            try:
                conn.request("POST", f"/v2/models/{test_models.image}/infer", body=body,
                             headers={"Content-Type": "application/json"})
            except OSError:
                with lock:
                    outcomes["not sent"] += 1
                conn.close()
                conn = None
                continue
            try:
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    outcomes[f"unanswered: {type(e).__name__}"] += 1
                conn.close()
                conn = None
                continue
            with lock:
                outcomes[str(response.status)] += 1
                if (response.getheader("connection") or "").lower() == "close":
                    closed_by_server[response.status] += 1
            if response.will_close:
                conn.close()
                conn = None

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(60)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.stop()
    assert not [k for k in outcomes if k.startswith("unanswered")], (outcomes, server.logs()[-2000:])
    assert set(outcomes) <= {"200", "503", "refused", "not sent"}, outcomes
    assert outcomes["200"] > 0 and closed_by_server[200] > 0, outcomes  # served through the grace
    assert server.process.returncode in (0, -signal.SIGTERM)  # one worker: uvicorn re-raises SIGTERM


def test_during_the_grace_period_readiness_fails_and_requests_are_served_with_close(
        test_models: TestModels, tmp_path):
    server = start_server(test_models.repository, tmp_path / "server.log", "--drain-grace-s", "3")
    host, port = server.host_port.split(":")
    try:
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/v2/health/ready")
        ready = conn.getresponse()
        ready.read()
        assert ready.status == 503 and ready.getheader("retry-after") == "1"
        assert (ready.getheader("connection") or "").lower() == "close"
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", f"/v2/models/{test_models.image}/ready")
        model = conn.getresponse()
        model.read()
        assert model.status == 200 and (model.getheader("connection") or "").lower() == "close"
        assert server.process.poll() is None  # still serving
        server.process.wait(30)
        assert "serving for the grace period" in server.logs()
    finally:
        server.stop()


def _http_workers(supervisor: int, port: int) -> list[int]:
    """The supervisor's children that listen on the HTTP `port` (the workers, not the executor)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    workers = []
    for child in map(int, children):
        with contextlib.suppress(OSError):
            links = {os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")}
            if any(f"socket:[{inode}]" in links for inode in inodes):
                workers.append(child)
    return workers


def test_a_worker_killed_under_load_loses_only_its_own_requests(test_models: TestModels, tmp_path):
    server = start_server(test_models.repository, tmp_path / "server.log", "--workers", "2")
    host, port = server.host_port.split(":")
    body = orjson.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                     "data": [0] * 784}]})
    before: collections.Counter[str] = collections.Counter()
    after: collections.Counter[str] = collections.Counter()
    killed = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        conn = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=15)
                conn.request("POST", f"/v2/models/{test_models.image}/infer", body=body,
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                outcome = str(response.status)
            except (OSError, http.client.HTTPException) as e:
                outcome = type(e).__name__
                conn = None
            with lock:
                (after if killed.is_set() else before)[outcome] += 1

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    try:
        deadline = time.monotonic() + 60
        while len(workers := _http_workers(server.process.pid, int(port))) < 2:  # ready: one listens
            assert time.monotonic() < deadline, workers
            time.sleep(0.1)
        for t in threads:
            t.start()
        time.sleep(1.0)
        killed.set()  # first: a request the kill breaks must count as after it
        os.kill(workers[0], signal.SIGKILL)
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(30)
        deadline = time.monotonic() + 60
        while len(replaced := _http_workers(server.process.pid, int(port))) < 2:
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.2)
        assert workers[0] not in replaced
    finally:
        stop.set()
        server.stop()
    assert set(before) == {"200"}, before
    lost = sum(n for outcome, n in after.items() if outcome not in ("200", "503"))
    # At most the requests in flight on the killed worker's connections, one per client.
    assert lost <= CLIENTS, after
    assert after["200"] > 10 * CLIENTS, after  # the other worker (and the new one) kept serving
