"""A simulated device for benchmarking the front-end → executor path without a GPU.

`SimulatedRuntime` takes the place of ONNX Runtime in the executor (the service reads
`NEUROSERVE_RUNTIME_FACTORY=bench.simulated_device:SimulatedRuntime`). It reads the real graph for
its inputs and outputs, so the model's config is checked as usual, but a "run" only sleeps
a + b·rows seconds with the GIL released (as a GPU kernel leaves the CPU free) and returns zeros.
Its ceiling is therefore known exactly: at batch B it computes B / (a + b·B) rows per second, and a
benchmark shows how close the service gets to it and where the front-ends become the limit.

    BENCH_DEVICE_A_MS=1.0 BENCH_DEVICE_B_MS=0.01   # the defaults
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.core.runtime import Runtime
from service.settings import Settings

A_S = float(os.environ.get("BENCH_DEVICE_A_MS", "1.0")) / 1000
B_S = float(os.environ.get("BENCH_DEVICE_B_MS", "0.01")) / 1000

_NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}


def ceiling(batch: int, a_s: float = A_S, b_s: float = B_S) -> float:
    """Rows per second of the device at full batches of `batch` rows."""
    return batch / (a_s + b_s * batch)


class SimulatedRuntime(Runtime):
    def __init__(self, path: Path, settings: Settings, instances: int) -> None:
        super().__init__(path, settings, 1)  # the graph's signature, for the config check
        self.sessions = self.sessions * instances
        self.provider = "SimulatedDevice"

    def run(self, instance: int, feeds: dict[str, np.ndarray],
            output_names: Sequence[str]) -> list[np.ndarray]:
        rows = len(next(iter(feeds.values())))
        time.sleep(A_S + B_S * rows)  # releases the GIL, as a device kernel would leave the CPU
        shapes = {t.name: t for t in self.outputs}
        out = []
        for name in output_names:
            t = shapes[name]
            shape = (rows, *(d or 1 for d in t.shape[1:]))
            out.append(np.zeros(shape, dtype=_NUMPY.get(t.datatype, np.float32)))
        return out
