"""Per-caller token buckets: a key with `rate = R` may make R requests a second, in bursts of up to
R (at least one). A key with `rows = N` may send N rows (inputs) a second: a request's rows are only
known once its body is decoded, so they are charged when it has been answered (the bucket may go
below zero) and a request is admitted while the bucket holds any rows.

Each worker process keeps its own buckets (a client's connection stays on one worker, see
service.server.workers), so with N workers a caller spreading connections over all of them gets up
to N × R.

The answer carries the `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` headers of
the IETF RateLimit header fields draft; a refusal is 429 with `Retry-After`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens per second
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float) -> TokenBucket:
        burst = max(1.0, rate)
        return cls(rate, burst, burst, time.monotonic())

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def headers(self, now: float) -> dict[str, str]:
        reset = (self.burst - self.tokens) / self.rate
        return {"RateLimit-Limit": f"{self.burst:g}", "RateLimit-Remaining": str(int(self.tokens)),
                "RateLimit-Reset": str(math.ceil(reset))}

    def retry_after_s(self) -> int:
        return max(1, math.ceil((1.0 - self.tokens) / self.rate))


class RowBucket(TokenBucket):
    def charge(self, rows: int, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - rows
        self.stamp = now

    def admits(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens > 0

    def retry_after_s(self) -> int:
        return max(1, math.ceil(-self.tokens / self.rate + 1e-9))


class Quotas:
    """The buckets of every caller seen, by key name (`""`: anonymous callers, all in one bucket)."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self._rows: dict[str, RowBucket] = {}

    def _row_bucket(self, caller: str, rate: float) -> RowBucket:
        bucket = self._rows.get(caller)
        if bucket is None or bucket.rate != rate:
            burst = max(1.0, rate)
            bucket = self._rows[caller] = RowBucket(rate, burst, burst, time.monotonic())
        return bucket

    def rows_admit(self, caller: str, rate: float) -> str | None:
        """None when `caller` may send a request now, else the Retry-After value in seconds."""
        bucket = self._row_bucket(caller, rate)
        return None if bucket.admits(time.monotonic()) else str(bucket.retry_after_s())

    def charge_rows(self, caller: str, rate: float, rows: int) -> None:
        self._row_bucket(caller, rate).charge(rows, time.monotonic())

    def take(self, caller: str, rate: float) -> tuple[bool, dict[str, str]]:
        """(allowed, headers to send) for one request of `caller` limited to `rate` per second."""
        bucket = self._buckets.get(caller)
        if bucket is None or bucket.rate != rate:  # new caller, or its rate changed in the keys file
            bucket = self._buckets[caller] = TokenBucket.full(rate)
        now = time.monotonic()
        allowed = bucket.take(now)
        headers = bucket.headers(now)
        if not allowed:
            headers["Retry-After"] = str(bucket.retry_after_s())
        return allowed, headers
