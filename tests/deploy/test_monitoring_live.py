"""A real Prometheus scrapes a real service: the metrics arrive with the right labels and counts,
the alert rules load and stay quiet on a healthy service, and every query of the Grafana dashboard
returns data.

The service serves the tiny repository of conftest.py; the traffic below goes through every
endpoint kind (V2 infer, image, text, audio uploads) plus one malformed request, so that every
metric family of the contract has samples.
"""

from __future__ import annotations

import io
import math
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.deploy.conftest import IMAGE_SIZE, SAMPLE_RATE, VOCAB
from tests.deploy.support import load_dashboard, panels, wait_until

MODELS = ("tiny-image", "tiny-speech", "tiny-text")
PROVIDER = "CPUExecutionProvider"
# Grafana's substitutions: `$model` with all models selected (a multi-value regex), `$__rate_interval`
# long enough to cover the test's traffic at a 1 s scrape interval.
MODEL_REGEX = "(" + "|".join(MODELS) + ")"
RATE_INTERVAL = "1m"

# Requests sent per wave per (model, endpoint, HTTP status), and rows they carry.
WAVES = 2
IMAGE_V2_REQUESTS, IMAGE_V2_ROWS = 6, 2
TEXT_V2_LENGTHS = (2, 3, 5, 8)
SPEECH_V2_REQUESTS = 3
TEXTS = ["good movie", "the film was awful awful bad"]
EXPECTED_REQUESTS = {
    ("tiny-image", "v2_infer", "200"): IMAGE_V2_REQUESTS,
    ("tiny-image", "v2_infer", "400"): 1,
    ("tiny-image", "image", "200"): 1,
    ("tiny-text", "v2_infer", "200"): len(TEXT_V2_LENGTHS),
    ("tiny-text", "text", "200"): 1,
    ("tiny-speech", "v2_infer", "200"): SPEECH_V2_REQUESTS,
    ("tiny-speech", "audio", "200"): 1,
}
# Rows that reached ONNX Runtime, and queue entries (a task request queues each input on its own).
EXPECTED_ROWS = {"tiny-image": IMAGE_V2_REQUESTS * IMAGE_V2_ROWS + 1,
                 "tiny-text": len(TEXT_V2_LENGTHS) + len(TEXTS),
                 "tiny-speech": SPEECH_V2_REQUESTS + 1}
EXPECTED_QUEUED = {"tiny-image": IMAGE_V2_REQUESTS + 1,
                   "tiny-text": len(TEXT_V2_LENGTHS) + len(TEXTS),
                   "tiny-speech": SPEECH_V2_REQUESTS + 1}


def v2_body(name: str, array: np.ndarray, datatype: str) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype,
                        "data": array.ravel().tolist()}]}


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (IMAGE_SIZE * 3, IMAGE_SIZE * 2), value).save(out, format="PNG")
    return out.getvalue()


def wav(seconds: float, rate: int) -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


def send_traffic(url: str) -> None:
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=url, timeout=30) as client:

        def post(path: str, expected: int = 200, **kwargs: Any) -> None:
            response = client.post(path, **kwargs)
            assert response.status_code == expected, f"{path}: {response.status_code} {response.text}"

        image_bodies = [v2_body("pixels", rng.integers(0, 256, (IMAGE_V2_ROWS, 1, IMAGE_SIZE, IMAGE_SIZE),
                                                       dtype=np.uint8), "UINT8")
                        for _ in range(IMAGE_V2_REQUESTS)]
        # Concurrent requests, so that the batcher merges some of them.
        with ThreadPoolExecutor(max_workers=IMAGE_V2_REQUESTS) as pool:
            list(pool.map(lambda body: post("/v2/models/tiny-image/infer", json=body), image_bodies))

        def text_body(length: int) -> dict[str, Any]:
            ids = rng.integers(2, len(VOCAB), (1, length), dtype=np.int64)
            body = v2_body("input_ids", ids, "INT64")
            body["inputs"].append(v2_body("attention_mask", np.ones_like(ids), "INT64")["inputs"][0])
            return body

        with ThreadPoolExecutor(max_workers=len(TEXT_V2_LENGTHS)) as pool:
            list(pool.map(lambda n: post("/v2/models/tiny-text/infer", json=text_body(n)), TEXT_V2_LENGTHS))
        samples = round(SAMPLE_RATE * 0.25)
        for _ in range(SPEECH_V2_REQUESTS):
            clip = (0.1 * rng.standard_normal((1, samples))).astype(np.float32)
            post("/v2/models/tiny-speech/infer", json=v2_body("waveform", clip, "FP32"))

        post("/v1/image/tiny-image", content=png(180), headers={"content-type": "image/png"})
        post("/v1/text/tiny-text", json={"texts": TEXTS})
        post("/v1/audio/tiny-speech", content=wav(0.2, 16000), headers={"content-type": "audio/wav"})
        wrong_shape = np.zeros((1, 1, IMAGE_SIZE + 1, IMAGE_SIZE), dtype=np.uint8)
        post("/v2/models/tiny-image/infer", 400, json=v2_body("pixels", wrong_shape, "UINT8"))


class Prometheus:
    """Queries evaluated at one instant, `at` (once set): the tests then read a fixed state of the
    database, which a later slow scrape on a busy machine (marking series stale) cannot change."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.at: float | None = None

    def query(self, expr: str) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if self.at is not None:
            params["time"] = self.at
        payload = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10).json()
        assert payload["status"] == "success", f"{expr}: {payload}"
        return payload["data"]["result"]

    def query_range(self, expr: str, seconds: int = 30) -> list[dict[str, Any]]:
        end = self.at if self.at is not None else time.time()
        params = {"query": expr, "start": end - seconds, "end": end, "step": 1}
        payload = httpx.get(f"{self.url}/api/v1/query_range", params=params, timeout=10).json()
        assert payload["status"] == "success", f"{expr}: {payload}"
        return payload["data"]["result"]

    def values(self, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        """Instant vector as {label values: value}."""
        return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
                for r in self.query(expr)}

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def prom(prometheus: str, service: str) -> Prometheus:
    """Prometheus after the traffic: the last scrape has seen every request the test sent."""
    p = Prometheus(prometheus)
    wait_until(lambda: p.values('up{job="neuroserve"}') == {(): 1.0}, timeout=30,
               what="Prometheus's first scrape of the service")
    # Twice, with a scrape in between: a counter child appears at its first increment, and rate()
    # needs a second sample of it to see an increase.
    for wave_ in range(1, WAVES + 1):
        send_traffic(service)
        total = wave_ * sum(EXPECTED_REQUESTS.values())
        wait_until(lambda total=total: p.scalar("sum(neuroserve_requests_total)") == total,
                   timeout=30, what=f"a scrape showing all {total} requests")

    def settle() -> bool:
        p.at = time.time()
        if p.scalar("sum(neuroserve_requests_total)") == total and p.scalar('up{job="neuroserve"}') == 1:
            return True
        p.at = None
        return False

    wait_until(settle, timeout=30, what="an instant with a successful scrape of all requests")
    return p


def test_prometheus_scrapes_the_service_as_job_neuroserve(prom: Prometheus, service: str):
    up = prom.query('up{job="neuroserve"}')
    assert [(r["metric"]["instance"], r["value"][1]) for r in up] == [(service.removeprefix("http://"), "1")]


def test_requests_are_counted_by_model_endpoint_and_status(prom: Prometheus):
    durations = prom.values("neuroserve_request_duration_seconds_count", "model", "endpoint", "code")
    assert durations == {k: float(WAVES * v) for k, v in EXPECTED_REQUESTS.items()}
    labels = prom.query("neuroserve_request_duration_seconds_count")
    assert {(r["metric"]["version"], r["metric"]["provider"]) for r in labels} == {("1", PROVIDER)}

    # Counters of every ready model start at 0 (see service.observability.metrics.count_from_zero):
    # only count those the traffic moved.
    outcomes = prom.values("sum by (model, endpoint, outcome) (neuroserve_requests_total) > 0",
                           "model", "endpoint", "outcome")
    assert outcomes == {
        (m, e, "success" if code == "200" else "client_error"): float(WAVES * n)
        for (m, e, code), n in EXPECTED_REQUESTS.items()
    }


def test_malformed_input_is_counted_as_an_invalid_rejection(prom: Prometheus):
    rejections = prom.values("neuroserve_rejections_total > 0", "model", "reason")
    assert rejections == {("tiny-image", "invalid"): float(WAVES)}


def test_queue_compute_and_batch_histograms_account_for_every_row(prom: Prometheus):
    by_model = "sum by (model, version, provider) ({})"
    queued = prom.values(by_model.format("neuroserve_queue_duration_seconds_count"), "model", "version",
                         "provider")
    assert queued == {(m, "1", PROVIDER): float(WAVES * n) for m, n in EXPECTED_QUEUED.items()}
    rows = prom.values(by_model.format("neuroserve_batch_size_sum"), "model")
    assert rows == {(m,): float(WAVES * n) for m, n in EXPECTED_ROWS.items()}
    batches = prom.values(by_model.format("neuroserve_batch_size_count"), "model")
    computes = prom.values(by_model.format("neuroserve_compute_duration_seconds_count"), "model")
    assert batches == computes
    for (model,), n in batches.items():
        assert WAVES <= n <= WAVES * EXPECTED_QUEUED[model]
    # Padding is measured for the variable-length (text) model only, once per batch (the other
    # models' series exist, at zero).
    padding = prom.values(by_model.format("neuroserve_padding_ratio_count") + " > 0", "model")
    assert padding == {("tiny-text",): batches[("tiny-text",)]}


def test_every_row_gets_a_prediction_and_a_confidence(prom: Prometheus):
    predictions = prom.values("sum by (model) (neuroserve_predictions_total)", "model")
    assert predictions == {(m,): float(WAVES * n) for m, n in EXPECTED_ROWS.items()}
    confidence = prom.values("sum by (model) (neuroserve_prediction_confidence_count)", "model")
    assert confidence == predictions
    labels = {r["metric"]["label"] for r in prom.query('neuroserve_predictions_total{model="tiny-image"}')}
    assert labels <= {"circle", "square", "triangle"} and labels


def test_input_statistics_are_recorded_per_task(prom: Prometheus):
    # Every model version has every input histogram (at zero); only its own task's fills.
    assert prom.values("neuroserve_input_image_mean_intensity_count > 0", "model") == {
        ("tiny-image",): float(WAVES * EXPECTED_ROWS["tiny-image"])}
    assert prom.values("neuroserve_input_text_tokens_count > 0", "model") == {
        ("tiny-text",): float(WAVES * EXPECTED_ROWS["tiny-text"])}
    assert prom.values("neuroserve_input_audio_rms_count > 0", "model") == {
        ("tiny-speech",): float(WAVES * EXPECTED_ROWS["tiny-speech"])}
    # The clip's own length is only known for uploads (V2 clients send fitted samples).
    durations = prom.values("neuroserve_input_audio_duration_seconds_sum > 0", "model")
    assert durations == {("tiny-speech",): pytest.approx(WAVES * 0.2)}


def test_model_gauges_show_every_model_ready_and_idle(prom: Prometheus):
    state = prom.values("neuroserve_model_state", "model", "version", "state")
    for model in MODELS:
        assert state[(model, "1", "ready")] == 1
        assert state[(model, "1", "loading")] == state[(model, "1", "unavailable")] == 0
    assert prom.values("neuroserve_model_info", "model", "version", "provider") == {
        (m, "1", PROVIDER): 1.0 for m in MODELS}
    loads = prom.values("neuroserve_model_load_duration_seconds", "model")
    assert set(loads) == {(m,) for m in MODELS} and all(v > 0 for v in loads.values())
    assert prom.values("neuroserve_queue_depth", "model") == {(m,): 0.0 for m in MODELS}
    assert prom.values("neuroserve_inflight_requests", "model") == {(m,): 0.0 for m in MODELS}


def test_process_metrics_are_scraped(prom: Prometheus):
    assert prom.scalar('sum(process_resident_memory_bytes{job="neuroserve"})') > 10e6
    assert prom.scalar('sum(process_cpu_seconds_total{job="neuroserve"})') > 0


def test_alert_rules_load_and_none_fires_on_a_healthy_service(prom: Prometheus):
    payload = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]
    rules = [r for g in payload["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} >= {"NeuroserveDown", "NeuroserveModelNotReady"}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # Go's zero time marks a rule never evaluated.
    assert not [r["name"] for r in rules if r["lastEvaluation"].startswith("0001-")]
    assert prom.query("ALERTS") == []


def dashboard_queries() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p['title']} {t['refId']}", t) for p in panels(load_dashboard()) for t in p.get("targets", [])]


def grafana_substitute(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$model", MODEL_REGEX)


QUERIES = dashboard_queries()


@pytest.mark.parametrize("target", [t for _, t in QUERIES], ids=[name for name, _ in QUERIES])
def test_dashboard_query_returns_data(prom: Prometheus, target: dict[str, Any]):
    expr = grafana_substitute(target["expr"])
    assert "$" not in expr, expr
    if target.get("instant"):
        values = [float(r["value"][1]) for r in prom.query(expr)]
    else:
        values = [float(v) for r in prom.query_range(expr) for _, v in r["values"]]
    assert any(math.isfinite(v) for v in values), f"no data (or only NaN) for {expr}"


def test_dashboard_model_variable_lists_the_served_models(prom: Prometheus):
    variable = next(v for v in load_dashboard()["templating"]["list"] if v["name"] == "model")
    metric = variable["query"].removeprefix("label_values(").split(",")[0]
    response = httpx.get(f"{prom.url}/api/v1/label/model/values", params={"match[]": metric}, timeout=10)
    assert response.json()["data"] == sorted(MODELS)
