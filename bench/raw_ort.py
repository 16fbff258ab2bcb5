"""The ceiling: ONNX Runtime in this process, no HTTP, samples/s and latency per batch size.

Batches are made of the workload's own samples (text: `workloads.raw_workload`, sentences of mixed
lengths sorted by length, so each batch is padded to the longest in it as little as a server that
groups requests by length ever could), so the figure is what a server could reach if serving cost
nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.workloads import Workload

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)

CUDA = "CUDAExecutionProvider"
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": [CUDA, "CPUExecutionProvider"]}


def session(model_onnx: Path, threads: int, provider: str = "cpu") -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(model_onnx), opts, providers=PROVIDERS[provider])
    # onnxruntime-gpu falls back to the CPU when the CUDA libraries are missing: a figure measured
    # that way must not be reported as a CUDA one.
    if provider == "cuda" and sess.get_providers()[0] != CUDA:
        raise RuntimeError(f"the CUDA provider did not bind for {model_onnx} ({sess.get_providers()})")
    return sess


def measure(sess: ort.InferenceSession, w: Workload, batch_size: int, *, duration_s: float = 2.0,
            max_calls: int = 100_000) -> dict:
    """Run rounds of batches for at least `duration_s` (after a short warm-up); throughput and call
    latency."""
    n_batches = max(1, len(w.samples) // batch_size)  # every sample once per round
    batches = [w.batch(batch_size, start=i * batch_size) for i in range(n_batches)]
    for b in batches[:3]:
        sess.run(None, b)
    times = []
    start = time.perf_counter()
    i = 0
    # Whole rounds only: with length-sorted text, a round's first batches are its shortest.
    while i % n_batches or (i < max_calls and time.perf_counter() - start < duration_s):
        t = time.perf_counter()
        sess.run(None, batches[i % n_batches])
        times.append(time.perf_counter() - t)
        i += 1
    elapsed = time.perf_counter() - start
    lat = np.asarray(times) * 1e3
    return {
        "batch_size": batch_size, "calls": len(times), "samples_per_s": len(times) * batch_size / elapsed,
        "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()),
    }


def run(w: Workload, model_onnx: Path, *, threads: int | None = None,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES, duration_s: float = 2.0,
        provider: str = "cpu") -> dict:
    threads = threads or os.cpu_count() or 1
    sess = session(model_onnx, threads, provider)
    points = [measure(sess, w, b, duration_s=duration_s) for b in batch_sizes]
    best = max(points, key=lambda p: p["samples_per_s"])
    return {"model": w.model, "provider": provider, "ort_threads": threads, "points": points,
            "best_batch_size": best["batch_size"], "best_samples_per_s": best["samples_per_s"],
            "batch1_p50_ms": next((p["p50_ms"] for p in points if p["batch_size"] == 1), None)}
