"""Per model version inference statistics in the shape of Triton's statistics extension.

Counted in the worker process that served the requests (Prometheus metrics are the cross-worker view).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class Stats:
    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # ORT calls
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def batch(self, rows: int, requests: int, input_s: float, infer_s: float, output_s: float) -> None:
        """One ORT call of `rows` rows serving `requests` requests."""
        self.calls([(rows, infer_s)], requests, input_s, output_s)

    def calls(self, calls: Sequence[tuple[int, float]], requests: int, input_s: float,
              output_s: float) -> None:
        """The ORT calls, each (rows, seconds), that served `requests` requests together: one, or
        several for a request larger than a batch (counted once, with all its rows)."""
        if not calls:
            return
        self.execution_count += len(calls)
        self.inference_count += sum(rows for rows, _ in calls)
        self.last_inference_ms = int(time.time() * 1000)
        self.compute_input.add(input_s, requests)
        self.compute_infer.add(sum(seconds for _, seconds in calls), requests)
        self.compute_output.add(output_s, requests)
        for i, (rows, infer_s) in enumerate(calls):
            b = self.batches.get(rows)
            if b is None:
                b = self.batches[rows] = BatchStats()
            # Merging and splitting happen once per request, around the first and the last call.
            b.compute_input.add(input_s if i == 0 else 0.0)
            b.compute_infer.add(infer_s)
            b.compute_output.add(output_s if i == len(calls) - 1 else 0.0)

    def json(self, name: str, version: str) -> dict[str, Any]:
        empty = Duration().json()
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.json(),
                "fail": self.fail.json(),
                "queue": self.queue.json(),
                "compute_input": self.compute_input.json(),
                "compute_infer": self.compute_infer.json(),
                "compute_output": self.compute_output.json(),
                "cache_hit": empty,
                "cache_miss": empty,
            },
            "batch_stats": [
                {
                    "batch_size": rows,
                    "compute_input": b.compute_input.json(),
                    "compute_infer": b.compute_infer.json(),
                    "compute_output": b.compute_output.json(),
                }
                for rows, b in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }
