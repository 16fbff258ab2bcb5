"""One executor behind several front-ends (`--workers 2`): live model updates under load, a failed
update that changes nothing that serves, statistics that every worker reports alike, and the
executor's and a front-end's death."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service import models as m
from tests.service.servers import Server, start_server
from tests.service.test_workers import EXECUTOR_NAME, _comm, _spawned, executor_pid, worker_pids

BODY = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                    "data": np.arange(784, dtype=np.uint8).tolist()}]}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    m.image_model(repo, "img", versions=(1,))
    m.text_model(repo)
    return repo


def publish_version(repo: Path, model: str, version: int, onnx: bytes) -> None:
    """Write a version elsewhere, then rename it into place: it appears complete or not at all."""
    staging = repo / model / f".staging-{version}"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(onnx)
    staging.rename(repo / model / str(version))


class Load:
    """c connections each sending V2 JSON infers in a loop, counting answers by status and version."""

    def __init__(self, url: str, model: str, connections: int = 4) -> None:
        self.url, self.model = url, model
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.versions: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(connections)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"/v2/models/{self.model}/infer", json=BODY)
                except httpx.HTTPError as e:
                    with self.lock:
                        self.errors.append(repr(e))
                    continue
                with self.lock:
                    self.statuses[r.status_code] += 1
                    if r.status_code == 200:
                        self.versions.append((time.monotonic(), r.json()["model_version"]))
                    else:
                        self.errors.append(r.text)


def versions_seen(url: str, model: str, n: int = 20) -> Counter[str]:
    """The model_version of `n` requests, each on a fresh connection (so over both workers)."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        r = httpx.post(f"{url}/v2/models/{model}/infer", json=BODY, timeout=30)
        assert r.status_code == 200, r.text
        seen[r.json()["model_version"]] += 1
    return seen


def index(server: Server) -> list[dict[str, str]]:
    return httpx.post(f"{server.url}/v2/repository/index", timeout=10).json()


def test_live_update_under_load_loses_nothing(repo: Path, tmp_path: Path):
    server = start_server(repo, tmp_path / "server.log", "--workers", "2")
    try:
        onnx = (repo / "img" / "1" / "model.onnx").read_bytes()
        with Load(server.url, "img") as load:
            time.sleep(1.0)
            publish_version(repo, "img", 2, onnx)
            r = httpx.post(f"{server.url}/v2/repository/models/img/load", timeout=60)
            loaded = time.monotonic()
            assert r.status_code == 200, r.text
            time.sleep(1.5)
        assert load.statuses[200] > 50, (load.statuses, load.errors[:3])
        assert set(load.statuses) == {200} and not load.errors, (load.statuses, load.errors[:3])
        # Within a second of the load returning, every answer (either worker) is from version 2.
        late = {v for t, v in load.versions if t > loaded + 1.0}
        assert late == {"2"}, late
        assert versions_seen(server.url, "img") == Counter({"2": 20})
        entries = [e for e in index(server) if e["name"] == "img"]
        assert entries == [{"name": "img", "version": "2", "state": "READY", "reason": ""}], entries
    finally:
        assert server.stop() == 0, server.logs()


def test_a_broken_update_keeps_the_serving_version(repo: Path, tmp_path: Path):
    server = start_server(repo, tmp_path / "server.log", "--workers", "2")
    try:
        onnx = (repo / "img" / "1" / "model.onnx").read_bytes()
        with Load(server.url, "img") as load:
            time.sleep(0.5)
            publish_version(repo, "img", 3, onnx[: len(onnx) // 2])  # truncated
            r = httpx.post(f"{server.url}/v2/repository/models/img/load", timeout=60)
            assert r.status_code == 400, r.text
            assert "keep serving" in r.json()["error"], r.text
            time.sleep(0.5)
            ready = httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code
        assert set(load.statuses) == {200} and not load.errors, (load.statuses, load.errors[:3])
        assert {v for _, v in load.versions} == {"1"}
        assert ready == 200
        entries = {e["version"]: e for e in index(server) if e["name"] == "img"}
        assert entries["1"]["state"] == "READY"
        assert entries["3"]["state"] == "UNAVAILABLE" and entries["3"]["reason"], entries

        # A front-end killed now is replaced by one that serves what the others serve.
        victim = min(worker_pids(server.process.pid))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pids = worker_pids(server.process.pid)
            if len(pids) == 2 and victim not in pids:
                break
            time.sleep(0.2)
        wait_ready(server)
        assert versions_seen(server.url, "img", 30) == Counter({"1": 30})
    finally:
        assert server.stop() == 0, server.logs()


def wait_ready(server: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"not ready again:\n{server.logs()}")


def test_statistics_are_the_same_from_every_worker(repo: Path, tmp_path: Path):
    server = start_server(repo, tmp_path / "server.log", "--workers", "2")
    try:
        k = 37
        for _ in range(k):  # fresh connections: the kernel spreads them over both workers
            assert httpx.post(f"{server.url}/v2/models/img/infer", json=BODY, timeout=30).status_code == 200
        counts = set()
        for _ in range(10):
            stats = httpx.get(f"{server.url}/v2/models/img/stats", timeout=10).json()["model_stats"]
            counts.add(stats[0]["inference_count"])
        assert counts == {k}
    finally:
        assert server.stop() == 0, server.logs()


def metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_executor_crash_fails_fast_and_recovers(tmp_path: Path):
    repo = tmp_path / "models"
    m.slow_model(repo, width=1024, max_batch=4, delay_ms=1.0, queue=64)
    server = start_server(repo, tmp_path / "server.log", "--workers", "2", timeout=180)
    try:
        feed = {"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, 1024],
                            "data": [0.5] * 1024}]}
        results: list[int] = []

        def send() -> None:
            try:
                r = httpx.post(f"{server.url}/v2/models/slow/infer", json=feed, timeout=30)
                results.append(r.status_code)
            except httpx.HTTPError as e:
                results.append(-1)
                raise AssertionError(e) from e

        senders = [threading.Thread(target=send) for _ in range(16)]
        for t in senders:
            t.start()
        time.sleep(0.3)
        os.kill(executor_pid(server.process.pid), signal.SIGKILL)
        killed = time.monotonic()
        ready = 200
        while ready == 200 and time.monotonic() - killed < 2:
            ready = httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code
        not_ready_after = time.monotonic() - killed
        for t in senders:
            t.join(30)
        assert ready == 503 and not_ready_after < 1.0, not_ready_after
        assert len(results) == 16 and set(results) <= {200, 503}, results
        assert 503 in results  # the queue was not empty when the executor died
        wait_ready(server)
        assert httpx.post(f"{server.url}/v2/models/slow/infer", json=feed, timeout=30).status_code == 200
        # Nothing is in flight now: the dead executor's gauge files were retired.
        assert metric(server, "neuroserve_inflight_requests") == 0
    finally:
        assert server.stop() == 0, server.logs()


def test_poll_mode_serves_a_new_version_by_itself(repo: Path, tmp_path: Path):
    server = start_server(repo, tmp_path / "server.log", "--workers", "2", "--model-control-mode", "poll",
                          "--repository-poll-s", "0.3")
    try:
        publish_version(repo, "img", 2, (repo / "img" / "1" / "model.onnx").read_bytes())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if versions_seen(server.url, "img", 4) == Counter({"2": 4}):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"version 2 not served:\n{server.logs()}")
        shutil.rmtree(repo / "tiny-text")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = httpx.get(f"{server.url}/v2/models/tiny-text/ready", timeout=10)
            if r.status_code != 200:
                break
            time.sleep(0.2)
        else:
            pytest.fail("a removed model stayed ready")
    finally:
        assert server.stop() == 0, server.logs()


def test_no_process_outlives_a_killed_supervisor(repo: Path, tmp_path: Path):
    server = start_server(repo, tmp_path / "server.log", "--workers", "2")
    children = worker_pids(server.process.pid) | {executor_pid(server.process.pid)}
    assert len(children) == 3
    server.process.kill()  # SIGKILL: the supervisor cannot stop anything itself
    server.process.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = {pid for pid in children if _alive(pid)}
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, f"left behind: {alive}\n{server.logs()}"


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_one_executor_per_gpu_serves_as_one(repo: Path, tmp_path: Path):
    # `--gpus 0,1` on a machine without them: two executors on the CPU, the same mechanics.
    server = start_server(repo, tmp_path / "server.log", "--workers", "2", "--gpus", "0,1")
    try:
        executors = [pid for pid in _spawned(server.process.pid) if _comm(pid) == EXECUTOR_NAME]
        assert len(executors) == 2
        k = 30
        for _ in range(k):
            assert httpx.post(f"{server.url}/v2/models/img/infer", json=BODY, timeout=30).status_code == 200
        # Summed over both executors, from every worker.
        for _ in range(4):
            stats = httpx.get(f"{server.url}/v2/models/img/stats", timeout=10).json()["model_stats"]
            assert stats[0]["inference_count"] == k
        # One executor gone (either one): the other serves every new request meanwhile.
        for victim in executors:
            os.kill(victim, signal.SIGKILL)
            time.sleep(0.2)
            assert versions_seen(server.url, "img", 10) == Counter({"1": 10})
            wait_ready(server)
        onnx = (repo / "img" / "1" / "model.onnx").read_bytes()
        publish_version(repo, "img", 2, onnx)
        assert httpx.post(f"{server.url}/v2/repository/models/img/load", timeout=60).status_code == 200
        assert versions_seen(server.url, "img", 20) == Counter({"2": 20})
    finally:
        assert server.stop() == 0, server.logs()


def test_the_executor_repeats_its_catalog_for_front_ends_that_missed_it(repo: Path, tmp_path: Path):
    """A front-end connecting while the executor publishes can miss an update, or apply an older one
    after the answer to its own request; the executor therefore sends its unchanged catalog again
    every `REPUBLISH_S`, which a subscriber that connects late receives like any update."""
    import json

    import zmq

    from service.core import wire
    from service.core.executor import REPUBLISH_S

    server = start_server(repo, tmp_path / "server.log", "--workers", "2")
    try:
        started = next(json.loads(line) for line in server.logs().splitlines()
                       if '"executor starting"' in line)
        events = started["address"].replace("executor.sock", "catalog.sock")
        context = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVTIMEO, 5000)
        sub.connect(events)  # the models loaded long ago: nothing changes from here on
        try:
            first = sub.recv()
            t0 = time.monotonic()
            second = sub.recv()
            waited = time.monotonic() - t0
        finally:
            context.destroy(linger=0)
        assert first == second
        assert 0.5 * REPUBLISH_S <= waited <= 2 * REPUBLISH_S
        snapshot = wire.decode_snapshot(second)
        assert not snapshot["loading"] and {m["name"] for m in snapshot["models"]} == {"img", "tiny-text"}
    finally:
        assert server.stop() == 0, server.logs()
