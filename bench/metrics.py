"""Read the service's Prometheus histograms before and after a load point and keep the difference.

What the server itself saw during a point (batch sizes formed, time spent queued and computing)
tells why the client-side numbers are what they are.
"""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

HISTOGRAMS = {
    "batch_size": "neuroserve_batch_size",
    "queue_s": "neuroserve_queue_duration_seconds",
    "compute_s": "neuroserve_compute_duration_seconds",
}

Buckets = dict[float, float]  # cumulative count per upper bound `le`


def scrape(base_url: str, timeout: float = 5.0) -> str | None:
    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def parse(text: str | None) -> dict[str, dict[str, dict]]:
    """{histogram key: {model: {"buckets": {le: cumulative}, "sum": s, "count": n}}}, summed over
    the other labels (version, provider)."""
    out: dict[str, dict[str, dict]] = {k: {} for k in HISTOGRAMS}
    if not text:
        return out
    by_family = {v: k for k, v in HISTOGRAMS.items()}
    for family in text_string_to_metric_families(text):
        key = by_family.get(family.name)
        if key is None:
            continue
        models: dict[str, dict] = defaultdict(
            lambda: {"buckets": defaultdict(float), "sum": 0.0, "count": 0.0})
        for s in family.samples:
            model = s.labels.get("model", "")
            if s.name.endswith("_bucket"):
                models[model]["buckets"][float(s.labels["le"])] += s.value
            elif s.name.endswith("_sum"):
                models[model]["sum"] += s.value
            elif s.name.endswith("_count"):
                models[model]["count"] += s.value
        out[key] = {m: {"buckets": dict(v["buckets"]), "sum": v["sum"], "count": v["count"]}
                    for m, v in models.items()}
    return out


def delta(before: dict, after: dict, model: str) -> dict[str, dict]:
    """Per histogram: the observations made between the two scrapes for `model`, summarised."""
    out = {}
    for key in HISTOGRAMS:
        a = after.get(key, {}).get(model)
        if not a:
            continue
        b = before.get(key, {}).get(model) or {"buckets": {}, "sum": 0.0, "count": 0.0}
        buckets = {le: a["buckets"][le] - b["buckets"].get(le, 0.0) for le in sorted(a["buckets"])}
        count = a["count"] - b["count"]
        total = a["sum"] - b["sum"]
        out[key] = {
            "count": count, "mean": total / count if count else float("nan"),
            "p50": quantile(buckets, 0.5), "p90": quantile(buckets, 0.9), "p99": quantile(buckets, 0.99),
            "buckets": {("+Inf" if math.isinf(le) else f"{le:g}"): c for le, c in buckets.items()},
        }
    return out


def quantile(buckets: Buckets, q: float) -> float:
    """The q-quantile from cumulative buckets, interpolated linearly inside a bucket (as Prometheus
    `histogram_quantile` does)."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return float("nan")
    rank = q * items[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in items:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return items[-1][0]
