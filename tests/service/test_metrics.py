"""Prometheus exposition: the agreed names, `promtool check metrics` clean, correct with 2 workers."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from service.observability import metrics
from tests.service import media
from tests.service.conftest import SERVED_PROVIDER, Server, TestModels, start_server

HISTOGRAMS = [
    "neuroserve_request_duration_seconds",
    "neuroserve_queue_duration_seconds",
    "neuroserve_compute_duration_seconds",
    "neuroserve_batch_size",
    "neuroserve_padding_ratio",
    "neuroserve_prediction_confidence",
    "neuroserve_input_image_mean_intensity",
    "neuroserve_input_text_tokens",
    "neuroserve_input_audio_duration_seconds",
    "neuroserve_input_audio_rms",
]
COUNTERS = ["neuroserve_requests_total", "neuroserve_rejections_total", "neuroserve_predictions_total"]
GAUGES = [
    "neuroserve_queue_depth",
    "neuroserve_inflight_requests",
    "neuroserve_model_state",
    "neuroserve_model_load_duration_seconds",
    "neuroserve_model_info",
]


def _traffic(url: str, test_models: TestModels, n: int = 5, keepalive: bool = True) -> None:
    limits = httpx.Limits(max_keepalive_connections=None if keepalive else 0)
    with httpx.Client(base_url=url, timeout=30, limits=limits) as c:
        for _ in range(n):
            assert c.post(f"/v1/image/{test_models.image}", content=media.png()).status_code == 200
        assert (
            c.post(f"/v1/text/{test_models.text}", json={"texts": ["a great film", "the plot"]}).status_code
            == 200
        )
        assert c.post(f"/v1/audio/{test_models.audio}", content=media.wav()).status_code == 200
        assert c.post(f"/v1/text/{test_models.text}", json={"text": ""}).status_code == 400
        assert c.post("/v2/models/nope/infer", content=b"{}").status_code == 404


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _value(samples: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in samples.items():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?", key)
        assert m, key
        if m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


def _promtool(text: str) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout.decode() + done.stderr.decode()
    )


def test_metrics_use_the_agreed_names_and_pass_promtool(server: Server, test_models: TestModels):
    _traffic(server.url, test_models)
    text = httpx.get(f"{server.url}/metrics").text
    for name in HISTOGRAMS:
        assert f"# TYPE {name} histogram" in text, name
    for name in COUNTERS:
        assert f"# TYPE {name} counter" in text, name
    for name in GAUGES:
        assert f"# TYPE {name} gauge" in text, name
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    assert "_created" not in text  # one series per counter/histogram, not two
    s = _samples(text)
    image = test_models.image
    assert (
        _value(s, "neuroserve_request_duration_seconds_count", model=image, endpoint="image", code="200") >= 5
    )
    assert (
        _value(
            s, "neuroserve_requests_total", model=test_models.text, endpoint="text", outcome="client_error"
        )
        >= 1
    )
    assert _value(s, "neuroserve_rejections_total", model=test_models.text, reason="invalid") >= 1
    assert _value(s, "neuroserve_requests_total", model="_unknown", endpoint="v2_infer") >= 1
    assert _value(s, "neuroserve_model_info", model=image, provider=SERVED_PROVIDER) >= 1
    assert _value(s, "neuroserve_model_state", model=image, state="ready") >= 1
    assert _value(s, "neuroserve_padding_ratio_count", model=test_models.text) >= 1
    assert _value(s, "neuroserve_predictions_total", model=image) >= 5
    assert _value(s, "neuroserve_input_audio_duration_seconds_count", model=test_models.audio) >= 1
    buckets = [k for k in s if k.startswith("neuroserve_batch_size_bucket{")]
    assert {re.search(r'le="([^"]+)"', k).group(1) for k in buckets} >= {"1.0", "2.0", "256.0", "+Inf"}
    latency = [k for k in s if k.startswith("neuroserve_compute_duration_seconds_bucket{")]
    assert {re.search(r'le="([^"]+)"', k).group(1) for k in latency} >= {"0.0001", "10.0"}
    _promtool(text)


def _worker_pids(text: str, metric: str = "process_resident_memory_bytes") -> set[str]:
    """The worker pids a scrape shows: each worker labels its process metrics with its pid."""
    return set(re.findall(metric + r'\{pid="(\d+)"\}', text))


def _wait_for_worker_pids(url: str, n: int, timeout: float = 60) -> None:
    """Until `n` workers have announced themselves. The server is ready as soon as one worker is;
    another may still be starting, and a scrape cannot show a process that does not exist yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        if len(_worker_pids(text)) >= n:
            return
        time.sleep(0.1)
    raise TimeoutError(f"fewer than {n} workers announced themselves within {timeout} s")


def test_metrics_with_two_workers_add_up_and_show_each_process(test_models: TestModels, tmp_path: Path):
    server = start_server(test_models.repository, tmp_path / "server.log", "--workers", "2")
    try:
        _wait_for_worker_pids(server.url, 3)  # two front-ends and the executor
        n = 24
        # New connection per request, so that both workers take some.
        _traffic(server.url, test_models, n=n, keepalive=False)
        body = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "UINT8",
                        "shape": [1, 1, 28, 28],
                        "data": np.zeros(784, dtype=np.uint8).tolist(),
                    }
                ]
            }
        )
        with httpx.Client(
            base_url=server.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
        ) as c:
            for _ in range(n):
                assert c.post(f"/v2/models/{test_models.image}/infer", content=body).status_code == 200
            scrapes = [c.get("/metrics").text for _ in range(4)]
        for text in scrapes:  # whichever worker answers, the totals are the same
            s = _samples(text)
            image = test_models.image
            assert (
                _value(s, "neuroserve_requests_total", model=image, endpoint="image", outcome="success") == n
            )
            assert (
                _value(s, "neuroserve_requests_total", model=image, endpoint="v2_infer", outcome="success")
                == n
            )
            assert (
                _value(s, "neuroserve_request_duration_seconds_count", model=image, endpoint="v2_infer") == n
            )
            assert _value(s, "neuroserve_batch_size_sum", model=image) == 2 * n
            assert _value(s, "neuroserve_queue_depth", model=image) == 0
            # Each process shows its memory and CPU: the two front-ends and the executor.
            pids = _worker_pids(text)
            assert len(pids) == 3, pids
            assert len(_worker_pids(text, "process_cpu_seconds_total")) == 3
            # The executor's state gauge, once (front-ends set none).
            assert _value(s, "neuroserve_model_state", model=image, state="ready", version="1") == 1
        _promtool(scrapes[-1])
    finally:
        server.stop()


def test_model_state_and_info_follow_reload_unload_and_load(test_models: TestModels, tmp_path: Path):
    # A reload closes the old session of the same (model, version) after the new one is up: that
    # close must not mark the series the new one now owns as unloaded (nor its info as 0).
    model = test_models.image
    server = start_server(test_models.repository, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            version = c.get(f"/v2/models/{model}").json()["versions"][-1]
            infer = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                 "data": [7] * 784}]}

            def states() -> dict[str, float]:
                s = _samples(c.get("/metrics").text)
                out = {st: _value(s, "neuroserve_model_state", model=model, version=version, state=st)
                       for st in ("loading", "ready", "unavailable", "unloaded")}
                out["info"] = _value(s, "neuroserve_model_info", model=model, version=version)
                return out

            ready = {"loading": 0, "ready": 1, "unavailable": 0, "unloaded": 0, "info": 1}
            assert states() == ready
            assert c.post(f"/v2/repository/models/{model}/load").status_code == 200  # reload
            assert states() == ready
            assert c.post(f"/v2/models/{model}/infer", json=infer).status_code == 200
            assert c.post(f"/v2/repository/models/{model}/unload").status_code == 200
            assert states() == {"loading": 0, "ready": 0, "unavailable": 0, "unloaded": 1, "info": 0}
            assert c.post(f"/v2/repository/models/{model}/load").status_code == 200
            assert states() == ready
            assert c.post(f"/v2/models/{model}/infer", json=infer).status_code == 200
    finally:
        server.stop()


def _leave_mid_body(server: Server, path: str, content_type: str) -> None:
    """Send a request's head and a tenth of the body it announces, then hang up."""
    host, port = server.host_port.split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: 10000\r\n\r\n".encode() + b"\0" * 1000)


def test_a_client_that_leaves_mid_body_counts_as_499_not_as_a_server_error(
    server: Server, test_models: TestModels
):
    image, audio = test_models.image, test_models.audio
    log_before = len(server.logs())
    before = _samples(httpx.get(f"{server.url}/metrics").text)
    _leave_mid_body(server, f"/v2/models/{image}/infer", "application/json")
    _leave_mid_body(server, f"/v1/audio/{audio}", "audio/wav")

    def left() -> float:
        after = _samples(httpx.get(f"{server.url}/metrics").text)
        return sum(_value(after, "neuroserve_request_duration_seconds_count", model=m, code="499")
                   - _value(before, "neuroserve_request_duration_seconds_count", model=m, code="499")
                   for m in (image, audio))

    deadline = time.monotonic() + 10
    while left() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left() == 2
    after = _samples(httpx.get(f"{server.url}/metrics").text)
    for model, endpoint in ((image, "v2_infer"), (audio, "audio")):
        labels = {"model": model, "endpoint": endpoint}
        for outcome, more in (("error", 0), ("client_error", 1)):
            assert (_value(after, "neuroserve_requests_total", outcome=outcome, **labels)
                    == _value(before, "neuroserve_requests_total", outcome=outcome, **labels) + more)
    assert "unhandled error" not in server.logs()[log_before:]
    # and the server still serves
    assert httpx.post(f"{server.url}/v1/audio/{audio}", content=media.wav()).status_code == 200


def test_request_and_rejection_counters_start_at_zero_when_a_model_is_ready(
    test_models: TestModels, tmp_path: Path
):
    # So that rate() and increase() count the first request after a restart.
    server = start_server(test_models.repository, tmp_path / "server.log")
    try:
        text = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    s = _samples(text)
    series: dict[tuple[str, ...], float] = {}
    for key, value in s.items():
        if key.startswith(("neuroserve_requests_total{", "neuroserve_rejections_total{")):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
            series[(key.split("{")[0], labels["model"], labels.get("endpoint", ""),
                    labels.get("outcome", labels.get("reason", "")))] = value
    for model, task_endpoint in ((test_models.image, "image"), (test_models.text, "text"),
                                 (test_models.audio, "audio")):
        for endpoint in ("v2_infer", task_endpoint):
            for outcome in ("success", "client_error", "rejected", "error"):
                assert series.get(("neuroserve_requests_total", model, endpoint, outcome)) == 0, (
                    model, endpoint, outcome)
        for reason in ("queue_full", "deadline", "too_large", "invalid", "not_ready"):
            assert series.get(("neuroserve_rejections_total", model, "", reason)) == 0, (model, reason)
    _promtool(text)


@pytest.mark.parametrize("n", [1, 3, 64])
def test_observe_many_files_values_as_observe_does(n: int):
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from service.observability.metrics import LATENCY_BUCKETS, observe_many

    rng = np.random.default_rng(n)
    # Values on and around the bucket bounds, beyond the last one, and a NaN (skipped by both).
    values = np.concatenate([rng.choice(LATENCY_BUCKETS, n), rng.uniform(0, 12, n), [np.nan]])
    texts = []
    for bulk in (False, True):
        registry = CollectorRegistry()
        h = Histogram("t_seconds", "t", ["model"], buckets=LATENCY_BUCKETS, registry=registry).labels("m")
        if bulk:
            observe_many(h, values)
        else:
            for v in values[:-1].tolist():
                h.observe(v)
        texts.append(_samples(generate_latest(registry).decode()))
    bulk_sum = texts[1].pop('t_seconds_sum{model="m"}')
    loop_sum = texts[0].pop('t_seconds_sum{model="m"}')
    assert texts[1] == texts[0]
    assert bulk_sum == pytest.approx(loop_sum)


def test_a_duration_bucket_takes_an_exemplar_at_most_every_interval_and_a_rare_bucket_still_gets_its_own():
    from prometheus_client import REGISTRY
    from prometheus_client.openmetrics.exposition import generate_latest

    from service.observability.metrics import EXEMPLAR_INTERVAL_S, ModelMetrics

    m = ModelMetrics("exemplar-test", "1", "CPU")
    m.request("v2_infer", 200, 0.0003, "a" * 32)  # bucket le=0.0005
    m.request("v2_infer", 200, 0.0004, "b" * 32)  # same bucket, within the interval: no exemplar
    m.request("v2_infer", 200, 0.3, "c" * 32)  # a slow one, its own bucket: its exemplar
    text = generate_latest(REGISTRY).decode()
    lines = [ln for ln in text.splitlines() if 'model="exemplar-test"' in ln
             and ln.startswith("neuroserve_request_duration_seconds_bucket")]
    exemplars = {re.search(r'le="([^"]+)"', ln).group(1): ln.split("# ")[1] for ln in lines if "# " in ln}
    assert set(exemplars) == {"0.0005", "0.5"}
    assert "a" * 32 in exemplars["0.0005"] and "c" * 32 in exemplars["0.5"]
    assert re.search(r'le="0.0005",[^}]*} 2\.0', text)  # both requests were counted
    time.sleep(EXEMPLAR_INTERVAL_S)
    m.request("v2_infer", 200, 0.0004, "d" * 32)
    assert "d" * 32 in generate_latest(REGISTRY).decode()


def test_refusals_from_heads_are_counted_within_the_flush_interval_without_a_scrape():
    """Refusals from requests' heads are counted in plain numbers and written to the metrics every
    REFUSAL_FLUSH_S (a scrape writes them at once): with several workers the scrape reaches one
    worker, and the others' refusals must still arrive on their own."""
    model_metrics = metrics.ModelMetrics("deferred-test", "1", "CPU")

    def counted() -> tuple[float, float, float]:
        rejected = REGISTRY.get_sample_value("neuroserve_rejections_total",
                                             {"model": "deferred-test", "reason": "queue_full"}) or 0.0
        labels = {"model": "deferred-test", "version": "1", "endpoint": "v2_infer"}
        requests = REGISTRY.get_sample_value("neuroserve_requests_total",
                                             {**labels, "outcome": "rejected", "protocol": "http"}) or 0.0
        durations = REGISTRY.get_sample_value(
            "neuroserve_request_duration_seconds_count",
            {**labels, "provider": "CPU", "code": "429", "protocol": "http"}) or 0.0
        return rejected, requests, durations

    async def scenario():
        before = counted()
        for _ in range(5):
            metrics.defer_refusal("deferred-test", model_metrics, "v2_infer", 1e-5)
        at_once = counted()
        await asyncio.sleep(metrics.REFUSAL_FLUSH_S + 0.1)
        return before, at_once, counted()

    before, at_once, later = asyncio.run(scenario())
    assert at_once == before  # not yet written
    assert later == tuple(n + 5 for n in before)


def test_a_scrape_skips_a_metrics_file_another_process_is_still_creating(tmp_path: Path):
    """With several workers a scrape reads every process's metrics file; a process creates its
    file empty before sizing and heading it, and a scrape in between must neither fail (it
    answered 500) nor lose the settled files' values."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.mmap_dict import MmapedDict

    settled = MmapedDict(str(tmp_path / "counter_101.db"))
    key = orjson.dumps(["neuroserve_test_total", "neuroserve_test_total", {"model": "m"}, "A test."]).decode()
    settled.write_value(key, 7.0, 0.0)
    settled.close()
    (tmp_path / "counter_102.db").touch()  # the other process, between open() and truncate()

    reg = CollectorRegistry()
    metrics.SettledFilesCollector(reg, str(tmp_path))
    text = generate_latest(reg).decode()
    assert 'neuroserve_test_total{model="m"} 7.0' in text
