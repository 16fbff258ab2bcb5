"""SIGTERM under load: the server turns not-ready, keeps serving through --drain-grace-s with
`Connection: close`, then stops taking connections; no request that was fully sent goes unanswered."""

from __future__ import annotations

import collections
import http.client
import signal
import threading
import time

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
