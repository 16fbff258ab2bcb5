"""What the served int8 graphs buy over the FP32 graphs they were made from: one `session.run` at
batch 1 and 16, raw ONNX Runtime in process, graphs interleaved round by round so that a noisy
machine slows both alike.

The FP32 graphs are not shipped: `python -m training <model>` leaves them in the data cache as
`<model>-seed<seed>-fp32.onnx`. Which kernels ORT picks depends on the CPU (AVX2, AVX-512, VNNI),
so the result names the CPU it ran on.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.raw_ort import session
from bench.workloads import Workload, model_file, raw_workload
from training import data_cache

BATCH_SIZES = (1, 16)


def fp32_graph(model: str, seed: int = 0) -> Path:
    path = data_cache.fp32_graph(model, seed)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: `python -m training {model}` leaves it there")
    return path


def _median_ms(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], seconds: float) -> float:
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def run(model_dir: Path, *, threads: int = 1, rounds: int = 7, seconds: float = 0.4) -> dict:
    """Median latency of the served and the FP32 graph per batch size: the median over `rounds` of
    each round's median, the two graphs alternating within every round."""
    w: Workload = raw_workload(model_dir)
    graphs = {"int8": model_file(model_dir), "fp32": fp32_graph(model_dir.name)}
    sessions = {k: session(p, threads) for k, p in graphs.items()}
    feeds = {b: w.batch(b) for b in BATCH_SIZES}
    for sess in sessions.values():
        for f in feeds.values():
            for _ in range(10):
                sess.run(None, f)
    medians: dict[tuple[str, int], list[float]] = {(k, b): [] for k in sessions for b in BATCH_SIZES}
    for _ in range(rounds):
        for b in BATCH_SIZES:
            for k, sess in sessions.items():
                medians[(k, b)].append(_median_ms(sess, feeds[b], seconds))
    points = []
    for b in BATCH_SIZES:
        int8, fp32 = (float(np.median(medians[(k, b)])) for k in ("int8", "fp32"))
        points.append({"batch_size": b, "int8_ms": int8, "fp32_ms": fp32, "speedup": fp32 / int8})
    return {"model": model_dir.name, "threads": threads, "rounds": rounds,
            "bytes": {k: p.stat().st_size for k, p in graphs.items()}, "points": points}
