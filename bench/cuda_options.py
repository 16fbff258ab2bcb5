"""Ways of calling ONNX Runtime on a device, measured against each other in one process.

    python -m bench.cuda_options [--provider cuda] [--models sentiment,spoken-digits,fashion-mnist]
                                 [--batch 128] [--duration 3] [--out FILE]

The service calls `session.run` with host arrays: ONNX Runtime copies the inputs to the device and
the outputs back on every call. On a GPU three other ways may do better, and which does is a
measurement, not a guess (hence this benchmark, run by `bench/gpu_executor.sh`):

- `io_binding`: inputs written into device buffers allocated once (`OrtValue.update_inplace`),
  outputs left on the device and copied back explicitly, so no allocation per call;
- `cuda_graph`: the same binding with ONNX Runtime's `enable_cuda_graph`, which records the
  session's kernels once and replays them (fixed shapes only: one graph per batch shape);
- `two_sessions`: two sessions of the model, each called from its own thread, as two instances
  of a model would be (do two streams overlap, or time-slice?).

Each variant runs the model on one fixed batch (the workload's first `--batch` samples; text padded
to its longest) for `--duration` seconds after a warm-up, and reports samples/s, the p50 of one call
and its ratio to plain `run`. A variant the provider cannot do is reported with its error. On the
CPU provider `cuda_graph` is skipped; the others run, so the script is checked without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.executor import ROOT, emit
from bench.raw_ort import CUDA, PROVIDERS
from bench.workloads import load_workload, model_file

VARIANTS = ("run", "io_binding", "cuda_graph", "two_sessions")


def _session(path: Path, provider: str, cuda_graph: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list = list(PROVIDERS[provider])
    if provider == "cuda":
        providers[0] = (CUDA, {"enable_cuda_graph": "1" if cuda_graph else "0"})
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    if provider == "cuda" and sess.get_providers()[0] != CUDA:
        raise RuntimeError(f"the CUDA provider did not bind ({sess.get_providers()})")
    return sess


def _timed(call: Callable[[], object], duration_s: float) -> list[float]:
    for _ in range(5):
        call()
    times = []
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


def _bound_call(sess: ort.InferenceSession, feeds: dict[str, np.ndarray],
                device: str) -> Callable[[], object]:
    """A call that writes the host inputs into device buffers bound once and copies outputs back."""
    binding = sess.io_binding()
    buffers = {}
    for name, array in feeds.items():
        buffers[name] = ort.OrtValue.ortvalue_from_numpy(array, device, 0)
        binding.bind_ortvalue_input(name, buffers[name])
    for out in sess.get_outputs():
        binding.bind_output(out.name, device)

    def call() -> object:
        for name, array in feeds.items():
            buffers[name].update_inplace(array)  # the host-to-device copy a request's rows need
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    return call


def _measure(variant: str, path: Path, feeds: dict[str, np.ndarray], provider: str,
             duration_s: float) -> dict:
    rows = len(next(iter(feeds.values())))
    device = "cuda" if provider == "cuda" else "cpu"
    if variant == "run":
        sess = _session(path, provider)
        times = _timed(lambda: sess.run(None, feeds), duration_s)
    elif variant == "io_binding":
        times = _timed(_bound_call(_session(path, provider), feeds, device), duration_s)
    elif variant == "cuda_graph":
        if provider != "cuda":
            return {"skipped": "CUDA graphs need the CUDA provider"}
        times = _timed(_bound_call(_session(path, provider, cuda_graph=True), feeds, device), duration_s)
    else:  # two_sessions: throughput of both together, latency of each call
        sessions = [_session(path, provider) for _ in range(2)]
        per_thread: list[list[float]] = [[], []]

        def work(i: int) -> None:
            per_thread[i] = _timed(lambda: sessions[i].run(None, feeds), duration_s)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        calls = sum(len(t) for t in per_thread)
        return {"samples_per_s": round(calls * rows / duration_s),
                "p50_ms": round(statistics.median(per_thread[0] + per_thread[1]) * 1e3, 3)}
    return {"samples_per_s": round(len(times) * rows / sum(times)),
            "p50_ms": round(statistics.median(times) * 1e3, 3)}


def run(repository: Path, models: list[str], batch: int, duration_s: float, provider: str) -> dict:
    rows = []
    for model in models:
        w = load_workload(repository / model, n=batch)
        feeds = w.batch(batch)
        result: dict = {"model": model, "shapes": {k: list(v.shape) for k, v in feeds.items()}}
        for variant in VARIANTS:
            try:
                result[variant] = _measure(variant, model_file(repository / model), feeds, provider,
                                           duration_s)
            except Exception as e:  # a variant this provider cannot do is a finding
                result[variant] = {"error": f"{type(e).__name__}: {e}"[:500]}
        base = result["run"].get("samples_per_s")
        for variant in VARIANTS[1:]:
            if base and "samples_per_s" in result[variant]:
                result[variant]["vs_run"] = round(result[variant]["samples_per_s"] / base, 3)
        rows.append(result)
    return {"provider": provider, "onnxruntime": ort.__version__, "batch": batch,
            "duration_s": duration_s, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cuda_options", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--models", default="sentiment,spoken-digits,fashion-mnist")
    p.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    result = run(args.repository, args.models.split(","), args.batch, args.duration, args.provider)
    emit(result, "bench.cuda_options", argv, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
