"""REST prediction speed of this checkout against a git ref's, both running at once, interleaved.

    python -m bench.routes --base REF [--this REF] [--model fashion-mnist] [--duration 5] [--reps 3]
                           [--reference]

Both services start side by side (`bench.executor.start`, HTTP only); then for each rep, protocol
(V2 JSON, V2 binary) and concurrency (64, 1) each service gets one `wrk` run in turn, the order
alternating between reps, so both see the same machine. Prints JSON: medians of requests/s, p50/p99
and the server's CPU time per request per point; this checkout's requests/s as a ratio of REF's
(median of each rep's ratio) and its CPU per request as a ratio of REF's. `--reference` runs the
plain FastAPI + ONNX Runtime server (`bench.reference_server`, one worker) beside them, through V2
JSON only (the one protocol it speaks), in the same rotation.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

from bench.executor import ROOT, base_checkout, emit, start
from bench.load import closed_loop
from bench.servers import start_reference
from bench.workloads import load_workload, model_file, requests_for

PROTOCOLS = ("v2-json", "v2-binary")
CONCURRENCY = (64, 1)


def compare(base: str, this: str | None, repository: Path, model: str, duration: float, reps: int,
            workers: int, reference: bool = False) -> dict:
    w = load_workload(repository / model)
    requests = {p: requests_for(w, p) for p in PROTOCOLS}
    runs: dict[str, dict[str, list[dict]]] = {}
    with base_checkout(base) as base_code, \
            (base_checkout(this) if this else contextlib.nullcontext(ROOT)) as this_code:
        servers = {"base": start(base_code, repository, workers),
                   "this": start(this_code, repository, workers)}
        if reference:
            servers["reference"] = start_reference(model_file(repository / model), model, workers=1,
                                                   ort_threads=1)
        try:
            for name, server in servers.items():
                for p in _protocols(name):
                    closed_loop(server.port, requests[p], concurrency=64, duration_s=2)  # warm-up
            for rep in range(reps):
                order = list(servers) if rep % 2 == 0 else list(reversed(servers))
                for p in PROTOCOLS:
                    for c in CONCURRENCY:
                        for name in order:
                            if p not in _protocols(name):
                                continue
                            cpu = servers[name].cpu_seconds()
                            point = closed_loop(servers[name].port, requests[p], concurrency=c,
                                                duration_s=duration)
                            point["server_cpu_ms_per_request"] = (
                                (servers[name].cpu_seconds() - cpu) * 1e3 / max(1, point["ok"]))
                            runs.setdefault(f"{p} c={c}", {}).setdefault(name, []).append(point)
        finally:
            for server in servers.values():
                server.stop()
    medians = {point: {name: {"rps": round(statistics.median(r["rps"] for r in rs), 1),
                              "p50_ms": round(statistics.median(r["p50_ms"] for r in rs), 3),
                              "p99_ms": round(statistics.median(r["p99_ms"] for r in rs), 3),
                              "cpu_ms_per_request": round(statistics.median(
                                  r["server_cpu_ms_per_request"] for r in rs), 4),
                              "errors": sum(r["errors"] for r in rs),
                              "rps_each": [round(r["rps"], 1) for r in rs]}
                       for name, rs in by_name.items()}
               for point, by_name in runs.items()}
    for point, by_name in medians.items():
        # Each rep's two runs are neighbours in time: their ratio cancels most of the machine's drift.
        pairs = [t["rps"] / b["rps"] for t, b in zip(runs[point]["this"], runs[point]["base"], strict=True)]
        by_name["rps_ratio_paired"] = round(statistics.median(pairs), 3)
        by_name["cpu_ratio"] = round(by_name["this"]["cpu_ms_per_request"]
                                     / by_name["base"]["cpu_ms_per_request"], 3)
        if "reference" in by_name:
            by_name["p50_vs_reference"] = round(by_name["this"]["p50_ms"] / by_name["reference"]["p50_ms"], 3)
    return {"base": base, "this": this or "working tree", "model": model, "workers": workers,
            "duration_s": duration, "reps": reps, "medians": medians}


def _protocols(server: str) -> tuple[str, ...]:
    return ("v2-json",) if server == "reference" else PROTOCOLS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.routes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git ref whose service to compare with")
    p.add_argument("--this", help="git ref to measure instead of the working tree")
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="fashion-mnist")
    p.add_argument("--duration", type=float, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--reference", action="store_true",
                   help="also measure the plain FastAPI + ORT server (V2 JSON)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    result = compare(args.base, args.this, args.repository, args.model, args.duration, args.reps,
                     args.workers, args.reference)
    emit(result, "bench.routes", argv, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
