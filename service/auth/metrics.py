"""Per-key Prometheus counters, labelled by key name (never the secret; `_anonymous` for callers
without a key). The label set is bounded by the keys file."""

from __future__ import annotations

from prometheus_client import Counter

ANONYMOUS = "_anonymous"

KEY_REQUESTS = Counter(
    "neuroserve_api_key_requests", "Requests that passed authentication and quota, by API key name",
    ["key"])
KEY_REJECTIONS = Counter(
    "neuroserve_api_key_rejections",
    "Requests refused by authentication, scope or quota (unauthorized|forbidden|rate_limited), "
    "by API key name", ["key", "reason"])


_admitted: dict[str, Counter] = {}


def admitted(key: str | None) -> None:
    name = key or ANONYMOUS
    child = _admitted.get(name)
    if child is None:
        child = _admitted[name] = KEY_REQUESTS.labels(name)
    child.inc()


def refused(key: str | None, reason: str) -> None:
    KEY_REJECTIONS.labels(key or ANONYMOUS, reason).inc()
