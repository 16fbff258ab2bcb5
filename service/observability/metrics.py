"""Prometheus metrics: the names below are a public contract (alert rules and dashboards use them).

With several uvicorn workers the CLI sets PROMETHEUS_MULTIPROC_DIR before any worker imports this
module; prometheus-client then keeps each value in a per-process file, `/metrics` sums the files,
and `ProcessCollector` is replaced by `WorkerProcessCollector`, which reports every live worker's
memory and CPU with a `pid` label.
"""

from __future__ import annotations

import asyncio
import functools
import glob
import os
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

# `*_created` timestamps double the series count and no dashboard reads them.
disable_created_metrics()

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
UNKNOWN_MODEL = "_unknown"  # label for requests naming no known model: user input never becomes a label

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)
# A request duration bucket takes a traced request's id as its exemplar at most this often.
EXEMPLAR_INTERVAL_S = 0.1
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
RMS_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
EXPLANATION_BUCKETS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

PROVIDER_LABELS = ("model", "version", "provider")

REQUEST_DURATION = Histogram(
    "neuroserve_request_duration_seconds", "End-to-end request time inside the service",
    ["model", "version", "provider", "endpoint", "code", "protocol"], buckets=LATENCY_BUCKETS)
QUEUE_DURATION = Histogram(
    "neuroserve_queue_duration_seconds", "Time a request waited in the batch queue",
    PROVIDER_LABELS, buckets=LATENCY_BUCKETS)
COMPUTE_DURATION = Histogram(
    "neuroserve_compute_duration_seconds", "ONNX Runtime time per batch",
    PROVIDER_LABELS, buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram(
    "neuroserve_batch_size", "Rows per ONNX Runtime call", PROVIDER_LABELS, buckets=BATCH_BUCKETS)
PADDING_RATIO = Histogram(
    "neuroserve_padding_ratio", "Padding elements / all elements of a padded batch tensor",
    PROVIDER_LABELS, buckets=RATIO_BUCKETS)
PREDICTION_CONFIDENCE = Histogram(
    "neuroserve_prediction_confidence", "Top-1 probability per prediction",
    ["model", "version"], buckets=RATIO_BUCKETS)
INPUT_IMAGE_INTENSITY = Histogram(
    "neuroserve_input_image_mean_intensity", "Mean pixel value of an input image, 0 (black) to 1",
    ["model", "version"], buckets=RATIO_BUCKETS)
INPUT_TEXT_TOKENS = Histogram(
    "neuroserve_input_text_tokens", "Tokens per input text", ["model", "version"], buckets=TOKEN_BUCKETS)
INPUT_AUDIO_DURATION = Histogram(
    "neuroserve_input_audio_duration_seconds", "Duration of an input clip before fitting to the model",
    ["model", "version"], buckets=DURATION_BUCKETS)
INPUT_AUDIO_RMS = Histogram(
    "neuroserve_input_audio_rms", "Root-mean-square level of an input clip (full scale = 1)",
    ["model", "version"], buckets=RMS_BUCKETS)
EXPLANATION_ROWS = Histogram(
    "neuroserve_explanation_rows",
    "Rows (the input and its perturbed copies) one explanation computed, as one batcher request",
    ["model", "version"], buckets=EXPLANATION_BUCKETS)

REQUESTS = Counter(
    "neuroserve_requests", "Requests by outcome (success|client_error|rejected|error)",
    ["model", "version", "endpoint", "outcome", "protocol"])
REJECTIONS = Counter(
    "neuroserve_rejections",
    "Requests refused, by reason (queue_full|deadline|too_large|invalid|not_ready|read_timeout)",
    ["model", "reason"])
PREDICTIONS = Counter(
    "neuroserve_predictions", "Predictions by top-1 label", ["model", "version", "label"])
GRPC_GOAWAYS = Counter(
    "neuroserve_grpc_goaway",
    "GOAWAY frames sent on gRPC connections, by reason (no_error: shutdown or max age; otherwise "
    "the client's framing error: protocol_error, frame_size_error, compression_error, "
    "flow_control_error, enhance_your_calm)", ["reason"])
TRACE_EXPORTER_RESTARTS = Counter(
    "neuroserve_trace_exporter_restarts",
    "Times a front-end restarted its span exporter process after it died (tracing on)")

# Gauges: what each mode means once several workers write them.
QUEUE_DEPTH = Gauge(
    "neuroserve_queue_depth", "Rows waiting in batch queues (sum over workers)",
    ["model", "version"], multiprocess_mode="livesum")
INFLIGHT = Gauge(
    "neuroserve_inflight_requests", "Requests accepted by a batcher and not yet answered (sum over workers)",
    ["model", "version"], multiprocess_mode="livesum")
QUEUE_WAIT_BOUND = Gauge(
    "neuroserve_queue_wait_bound_seconds",
    "Expected queue wait over which a request is refused now: max_queue_wait_ms, lowered while "
    "admitted requests take longer than it (min over processes)",
    ["model", "version"], multiprocess_mode="livemin")
GRPC_CONNECTIONS = Gauge(
    "neuroserve_grpc_connections", "Open gRPC (HTTP/2) connections", multiprocess_mode="livesum")
MODEL_STATE = Gauge(
    "neuroserve_model_state", "1 for the model version's current state (max over workers)",
    ["model", "version", "state"], multiprocess_mode="livemax")
MODEL_LOAD_DURATION = Gauge(
    "neuroserve_model_load_duration_seconds", "Seconds the last load (session + warm-up) took",
    ["model", "version"], multiprocess_mode="livemax")
MODEL_INFO = Gauge(
    "neuroserve_model_info", "1 for each loaded model version, labelled by execution provider",
    PROVIDER_LABELS, multiprocess_mode="livemax")

MODEL_STATES = ("loading", "ready", "unavailable", "unloaded")
OUTCOMES = ("success", "client_error", "rejected", "error")
REJECTION_REASONS = ("queue_full", "deadline", "too_large", "invalid", "not_ready")
# The `endpoint` label of each task's own endpoint (besides `v2_infer` and `explain`, which every
# model has).
TASK_ENDPOINTS = {"image": "image", "text": "text", "speech": "audio"}
# The `protocol` label (http|grpc) of the request metrics: gRPC inferences are the `grpc_infer`
# endpoint, everything else came over HTTP.
GRPC_ENDPOINTS = frozenset({"grpc_infer"})


def protocol_of(endpoint: str) -> str:
    return "grpc" if endpoint in GRPC_ENDPOINTS else "http"

# Outcome of a response, from its status code.
_REJECTED_CODES = {413, 429, 503, 504}


def outcome(status: int) -> str:
    if status < 400:
        return "success"
    if status in _REJECTED_CODES:
        return "rejected"
    if status < 500:
        return "client_error"
    return "error"


_FEW = 4  # below this many values, numpy's call overhead costs more than it saves


def observe_many(histogram: Histogram, values: np.ndarray | Sequence[float]) -> None:
    """`histogram.observe(v)` for every v, with one write per touched bucket instead of per value.

    With several workers every write goes to a memory-mapped file under a lock; a batch's 64 queue
    times or prediction confidences then cost 64 × 2 writes instead of a few. Uses the histogram's
    own bounds and value cells (prometheus-client has no bulk observe); NaNs are skipped.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    cells = getattr(histogram, "_buckets", None)
    if len(values) <= _FEW or bounds is None or cells is None or len(cells) != len(bounds):
        for v in (values.tolist() if isinstance(values, np.ndarray) else values):
            if v == v:  # not NaN
                histogram.observe(v)
        return
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    histogram._raise_if_not_observable()
    # Bucket i holds bounds[i-1] < v <= bounds[i], as observe() files it; the last bound is +Inf.
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        cells[i].inc(int(counts[i]))
    histogram._sum.inc(float(values.sum()))


def set_model_state(model: str, version: str, state: str) -> None:
    for s in MODEL_STATES:
        MODEL_STATE.labels(model, version, s).set(1 if s == state else 0)


@dataclass
class ModelMetrics:
    """The label children of one model version, resolved once instead of on every request."""

    model: str
    version: str
    provider: str
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        p = (self.model, self.version, self.provider)
        mv = (self.model, self.version)
        self.queue = QUEUE_DURATION.labels(*p)
        self.compute = COMPUTE_DURATION.labels(*p)
        self.batch_size = BATCH_SIZE.labels(*p)
        self.padding = PADDING_RATIO.labels(*p)
        self.confidence = PREDICTION_CONFIDENCE.labels(*mv)
        self.image_intensity = INPUT_IMAGE_INTENSITY.labels(*mv)
        self.text_tokens = INPUT_TEXT_TOKENS.labels(*mv)
        self.audio_duration = INPUT_AUDIO_DURATION.labels(*mv)
        self.audio_rms = INPUT_AUDIO_RMS.labels(*mv)
        self.explanation_rows = EXPLANATION_ROWS.labels(*mv)
        self.queue_depth = QUEUE_DEPTH.labels(*mv)
        self.inflight = INFLIGHT.labels(*mv)
        self._predictions = [PREDICTIONS.labels(self.model, self.version, label) for label in self.labels]
        # Per (endpoint, status): the duration and count children, and when each duration bucket
        # may next take an exemplar.
        self._requests: dict[tuple[str, int], tuple[Histogram, Counter, list[float]]] = {}

    @functools.cached_property
    def wait_bound(self) -> Gauge:
        """Made where a batcher sets it: a front-end's child would report 0 beside the executor's."""
        return QUEUE_WAIT_BOUND.labels(self.model, self.version)

    def request(self, endpoint: str, status: int, seconds: float, trace_id: str | None = None) -> None:
        """Count a finished request; `trace_id` (an exported trace) becomes the duration's exemplar,
        at most one per bucket every `EXEMPLAR_INTERVAL_S`.

        A bucket shows only its latest exemplar, and scrapes are seconds apart: one per request
        would cost every traced request prometheus-client's label validation for nothing, while a
        request in a bucket that is rarely hit (the slow ones) still becomes its exemplar."""
        children = self._request_children(endpoint, status)
        if trace_id is not None:
            due = children[2]
            bucket = bisect_left(LATENCY_BUCKETS, seconds)
            now = monotonic()
            if now >= due[bucket]:
                due[bucket] = now + EXEMPLAR_INTERVAL_S
                # Kept only in one process: prometheus-client stores no exemplars with several workers.
                children[0].observe(seconds, {"trace_id": trace_id})
                children[1].inc()
                return
        children[0].observe(seconds)
        children[1].inc()

    def requests_refused(self, endpoint: str, durations: Sequence[float]) -> None:
        """Count refused (429) requests that took `durations`."""
        duration, count, _ = self._request_children(endpoint, 429)
        observe_many(duration, durations)
        count.inc(len(durations))

    def _request_children(self, endpoint: str, status: int) -> tuple[Histogram, Counter, list[float]]:
        """The duration histogram's and the request counter's children for one endpoint and status,
        and the times when each duration bucket may next take an exemplar."""
        children = self._requests.get((endpoint, status))
        if children is None:
            children = (
                REQUEST_DURATION.labels(self.model, self.version, self.provider, endpoint, str(status),
                                        protocol_of(endpoint)),
                REQUESTS.labels(self.model, self.version, endpoint, outcome(status), protocol_of(endpoint)),
                [0.0] * (len(LATENCY_BUCKETS) + 1),
            )
            self._requests[(endpoint, status)] = children
        return children

    def predictions(self, scores: np.ndarray) -> None:
        """Count top-1 labels and observe top-1 confidence for a (rows, classes) score matrix."""
        if scores.ndim != 2 or scores.shape[1] != len(self._predictions) or not len(scores):
            return
        top = scores.argmax(axis=1)
        observe_many(self.confidence, scores[np.arange(len(top)), top])
        for idx, n in enumerate(np.bincount(top, minlength=len(self._predictions)).tolist()):
            if n:
                self._predictions[idx].inc(n)


def count_from_zero(model: str, version: str, task: str) -> None:
    """Create a ready model version's request and rejection counters at 0.

    A series that first appears at 1 has no earlier sample, so `rate()` and `increase()` miss the
    first request after a restart; created at 0 when the model becomes ready, it counts from there.
    """
    for endpoint in ("v2_infer", TASK_ENDPOINTS.get(task), "explain"):
        if endpoint is not None:
            for outcome_ in OUTCOMES:
                REQUESTS.labels(model, version, endpoint, outcome_, protocol_of(endpoint))
    for reason in REJECTION_REASONS:
        REJECTIONS.labels(model, reason)


def request_without_model(endpoint: str, status: int, seconds: float, model: str = UNKNOWN_MODEL) -> None:
    """Requests that never reached a model version (unknown model, not ready, malformed)."""
    protocol = protocol_of(endpoint)
    REQUEST_DURATION.labels(model, "", "", endpoint, str(status), protocol).observe(seconds)
    REQUESTS.labels(model, "", endpoint, outcome(status), protocol).inc()


# The rejection counters by (model, reason): a refusal under overload is meant to cost next to
# nothing, and looking the child up (labels' validation) cost about as much as the rest of it.
_rejections: dict[tuple[str, str], Counter] = {}


def reject(model: str, reason: str, n: int = 1) -> None:
    child = _rejections.get((model, reason))
    if child is None:
        if len(_rejections) >= 4096:  # model names come from requests' paths
            _rejections.clear()
        child = _rejections[(model, reason)] = REJECTIONS.labels(model, reason)
    child.inc(n)


# Refusals from requests' heads, counted in plain numbers and written to the metrics at most every
# `REFUSAL_FLUSH_S` (and before every scrape): under overload they come by the ten thousand a second,
# and two metric writes (a lock each, and a memory-mapped file with several workers) were a tenth of
# a refusal's cost (docs/benchmarks.md, "A stale lag that refused everything, and refusals counted in bulk").
REFUSAL_FLUSH_S = 0.25
# (model, id of its ModelMetrics, endpoint) -> (that ModelMetrics, the refusals' durations)
_refusals: dict[tuple[str, int, str], tuple[ModelMetrics | None, list[float]]] = {}
_refusal_flush: asyncio.TimerHandle | None = None
_refusal_flush_loop: asyncio.AbstractEventLoop | None = None


def defer_refusal(model: str, model_metrics: ModelMetrics | None, endpoint: str, seconds: float) -> None:
    """A 429 (reason queue_full) for `model` that took `seconds`: counted like `reject` and
    `ModelMetrics.request` would, within `REFUSAL_FLUSH_S`."""
    global _refusal_flush, _refusal_flush_loop
    key = (model, id(model_metrics), endpoint)
    pending = _refusals.get(key)
    if pending is None:
        pending = _refusals[key] = (model_metrics, [])
    pending[1].append(seconds)
    loop = asyncio.get_running_loop()
    # A flush left on another loop (one that closed before it fired: tests run several) never runs.
    if _refusal_flush is None or _refusal_flush_loop is not loop:
        _refusal_flush = loop.call_later(REFUSAL_FLUSH_S, flush_refusals)
        _refusal_flush_loop = loop


def flush_refusals() -> None:
    """Write the refusals `defer_refusal` counted to the metrics."""
    global _refusal_flush
    if _refusal_flush is not None:
        _refusal_flush.cancel()
        _refusal_flush = None
    pending = list(_refusals.items())
    _refusals.clear()
    for (model, _, endpoint), (model_metrics, durations) in pending:
        reject(model, "queue_full", len(durations))
        if model_metrics is not None:
            model_metrics.requests_refused(endpoint, durations)


class WorkerProcessCollector:
    """`process_resident_memory_bytes` and `process_cpu_seconds_total` for every live worker.

    prometheus-client's ProcessCollector only sees the process that answers the scrape; in
    multiprocess mode each worker announces its pid with a file in the metrics directory and the
    scraping worker reads every announced pid's /proc entry.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.pagesize = os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def announce(directory: str) -> None:
        (Path(directory) / f"worker_{os.getpid()}.pid").touch()

    @staticmethod
    def retire(directory: str, pid: int | None = None) -> None:
        (Path(directory) / f"worker_{pid or os.getpid()}.pid").unlink(missing_ok=True)

    def collect(self) -> Iterable[Metric]:
        rss = GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                                labels=["pid"])
        cpu = CounterMetricFamily("process_cpu_seconds_total", "Total user and system CPU time in seconds.",
                                  labels=["pid"])
        for path in sorted(self.directory.glob("worker_*.pid")):
            pid = path.stem.removeprefix("worker_")
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the worker died without retiring its file
            # Fields after the command name: utime and stime are the 12th and 13th, rss the 22nd.
            cpu.add_metric([pid], (int(stat[11]) + int(stat[12])) / self.ticks)
            rss.add_metric([pid], int(stat[21]) * self.pagesize)
        yield rss
        yield cpu


class SettledFilesCollector(MultiProcessCollector):
    """prometheus-client's multiprocess collector, leaving out files still being created.

    A process creates its file for a metric type empty, then grows it to its mapped size and writes
    the header; a scrape that read it between the two failed with `struct.error` (a 500 from
    /metrics, seen at a worker's first requests). A file with bytes in it never shrinks and holds
    a valid header, so an empty one is simply read at the next scrape.
    """

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.stat(path).st_size > 0:
                    files.append(path)
            except FileNotFoundError:
                pass  # a dead process's live gauge, retired since the glob
        return self.merge(files, accumulate=True)


def registry() -> CollectorRegistry:
    if MULTIPROC_DIR is None:
        return REGISTRY
    reg = CollectorRegistry()
    SettledFilesCollector(reg, MULTIPROC_DIR)
    reg.register(WorkerProcessCollector(MULTIPROC_DIR))
    return reg


def worker_started() -> None:
    if MULTIPROC_DIR is not None:
        WorkerProcessCollector.announce(MULTIPROC_DIR)


def worker_stopped() -> None:
    """Drop this worker's live gauges from the aggregate (the `live*` multiprocess modes)."""
    if MULTIPROC_DIR is not None:
        WorkerProcessCollector.retire(MULTIPROC_DIR)
        mark_process_dead(os.getpid(), MULTIPROC_DIR)


def process_exited(pid: int | None) -> None:
    """For the supervisor: retire a dead worker's or executor's files (a process killed with -9
    never ran `worker_stopped`), so no gauge keeps its last value."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and pid:
        WorkerProcessCollector.retire(directory, pid)
        mark_process_dead(pid, directory)


def exposition(openmetrics: bool = False) -> tuple[bytes, str]:
    """The text format, or OpenMetrics (which Prometheus asks for first) when the scraper accepts
    it: only OpenMetrics carries exemplars, the trace ids on request durations."""
    flush_refusals()
    if openmetrics:
        return openmetrics_latest(registry()), OPENMETRICS_CONTENT_TYPE
    return generate_latest(registry()), CONTENT_TYPE_LATEST
