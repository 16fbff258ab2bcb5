"""What OpenTelemetry tracing costs: the service with tracing off, on (every request sampled and
exported to an OTLP/HTTP receiver in this process) and on with the collector down (a closed port),
under the same closed-loop load, in interleaved rounds on the same machine; and on at ratio 0.1.

    python -m bench.tracing --model models/fashion-mnist --rounds 3 --duration 8 [--baseline DIR]

Each round measures every configuration at concurrency 1 and 64 with wrk (V2 JSON, batch 1, the
model's sample inputs; each request without `traceparent`, so the service's ratio sampler decides,
at 1.0 here). It prints requests per second and p50/p99 per configuration: the median over rounds,
and every round's figure, so noise is visible; and the CPU time the service used per request
(its processes and their span exporters, until they have sent the point's spans), which other
work on the machine disturbs less than requests per second.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.load import closed_loop
from bench.servers import Server, cpu_seconds, free_port, start_service, wait_idle
from bench.workloads import load_workload, v2_json


class Sink:
    """An OTLP/HTTP endpoint that accepts every export and counts its bytes (no decoding: the cost
    under test is the service's, not the receiver's)."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector does

            def do_POST(self) -> None:
                n = int(self.headers.get("content-length", 0))
                self.rfile.read(n)
                sink.requests += 1
                sink.bytes += n
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _cpu(server: Server) -> tuple[float, float, float]:
    """CPU seconds so far: all the service's processes, its event loops, its span exporters."""
    return (server.cpu_seconds(), server.loop_cpu_seconds(),
            sum(cpu_seconds(pid) for pid in server.span_exporter_pids()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/fashion-mnist"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per measured point")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of the service without tracing (git worktree add DIR <commit>), "
                         "measured too, to show what tracing off costs")
    ap.add_argument("--previous", type=Path, default=None,
                    help="a checkout of the service with another tracing implementation, measured on at "
                         "ratio 1.0 too ('previous, ratio 1.0'), to compare the two in the same rounds")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="measure only these configurations (names as printed, e.g. 'off' 'on, ratio 1.0')")
    args = ap.parse_args(argv)

    workload = load_workload(args.model)
    requests = [v2_json(workload, s) for s in workload.samples]
    sink = Sink()
    configs = {
        "off": [],
        "on, ratio 1.0": ["--otlp-endpoint", sink.url, "--trace-sample-ratio", "1.0"],
        "on, ratio 0.1": ["--otlp-endpoint", sink.url, "--trace-sample-ratio", "0.1"],
        "on, collector down": ["--otlp-endpoint", f"http://127.0.0.1:{free_port()}",
                               "--trace-sample-ratio", "1.0"],
    }
    if args.configs:
        unknown = set(args.configs) - set(configs)
        if unknown:
            ap.error(f"unknown configurations {sorted(unknown)}; known: {sorted(configs)}")
        configs = {name: extra for name, extra in configs.items() if name in args.configs}
    # A repository of this model alone: the other shipped models would only slow start-up.
    repo = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    (repo / args.model.name).symlink_to(args.model.resolve(), target_is_directory=True)
    servers = {name: start_service(repo, extra_args=[*extra, "--intra-op-threads", "1"],
                                   env={"OTEL_BSP_SCHEDULE_DELAY": "1000"})
               for name, extra in configs.items()}
    if args.baseline is not None:
        # `python -m service` imports the package of its working directory: the baseline's.
        with contextlib.chdir(args.baseline):
            servers["before tracing"] = start_service(repo, extra_args=["--intra-op-threads", "1"])
        configs["before tracing"] = []
    if args.previous is not None:
        extra = configs["previous, ratio 1.0"] = ["--otlp-endpoint", sink.url, "--trace-sample-ratio", "1.0"]
        with contextlib.chdir(args.previous):
            servers["previous, ratio 1.0"] = start_service(
                repo, extra_args=[*extra, "--intra-op-threads", "1"], env={"OTEL_BSP_SCHEDULE_DELAY": "1000"})
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for srv in servers.values():  # warm every server up once
            closed_loop(srv.port, requests, concurrency=8, duration_s=2)
        for _ in range(args.rounds):
            for c in args.concurrency:
                for name, srv in servers.items():
                    wait_idle(servers.values())
                    before = _cpu(srv)
                    point = closed_loop(srv.port, requests, concurrency=c, duration_s=args.duration)
                    # The CPU the point cost, exporters included: until they have sent its spans.
                    wait_idle([srv])
                    n = max(1, point["requests"])
                    for key, was, now in zip(("cpu_us", "loop_cpu_us", "exporter_cpu_us"), before, _cpu(srv),
                                             strict=True):
                        point[key] = (now - was) / n * 1e6
                    results.setdefault((name, c), []).append(point)
    finally:
        for srv in servers.values():
            srv.stop()
        shutil.rmtree(repo, ignore_errors=True)
    print(f"model {workload.model}, {args.rounds} rounds × {args.duration:.0f} s per point; "
          f"exported {sink.requests} OTLP requests, {sink.bytes / 1e6:.1f} MB")
    print("| tracing | concurrency | req/s (median) | req/s per round | p50 ms | p99 ms | errors "
          "| server CPU µs/request | of which event loop | of which exporter |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for c in args.concurrency:
        for name in configs:
            points = results[(name, c)]
            rps = [p["rps"] for p in points]
            print(f"| {name} | {c} | {statistics.median(rps):.0f} | {', '.join(f'{r:.0f}' for r in rps)} | "
                  f"{statistics.median(p['p50_ms'] for p in points):.2f} | "
                  f"{statistics.median(p['p99_ms'] for p in points):.2f} | "
                  f"{sum(p['errors'] for p in points)} | "
                  f"{statistics.median(p['cpu_us'] for p in points):.0f} | "
                  f"{statistics.median(p['loop_cpu_us'] for p in points):.0f} | "
                  f"{statistics.median(p['exporter_cpu_us'] for p in points):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
