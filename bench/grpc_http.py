"""V2 over gRPC against V2 over HTTP with binary tensors: the same server, model, client library
(tritonclient) and closed-loop load from several threads, one protocol after the other.

    python -m bench.grpc_http --model fashion-mnist --threads 8 --duration 20

Starts `python -m service serve` on free ports of 127.0.0.1 (HTTP and gRPC). Then, one protocol
after the other, `--threads` threads, each with its own client and one request in flight (batch 1,
random pixels), call for `--warmup` seconds, then for `--duration` seconds measured; it prints
requests per second and latency percentiles as the client measured them, and the CPU time per
request of the server process and of the client (this process, every thread), over the measured
and warm-up seconds together.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from bench.servers import cpu_seconds

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_call(port: int, model: str, x: np.ndarray) -> Callable[[], None]:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
    inp = triton_http.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=True)
    out = [triton_http.InferRequestedOutput("probabilities", binary_data=True)]
    return lambda: client.infer(model, [inp], outputs=out).as_numpy("probabilities")


def _grpc_call(port: int, model: str, x: np.ndarray) -> Callable[[], None]:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
    inp = triton_grpc.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    out = [triton_grpc.InferRequestedOutput("probabilities")]
    return lambda: client.infer(model, [inp], outputs=out).as_numpy("probabilities")


def _load(factories: list[Callable[[], Callable[[], None]]], warmup: float, duration: float
          ) -> tuple[int, np.ndarray]:
    """Each thread makes its own client (tritonclient.http's gevent pool belongs to the thread that
    made it), calls for `warmup` seconds, then for `duration` seconds measured."""
    latencies: list[list[float]] = [[] for _ in factories]
    barrier = threading.Barrier(len(factories))
    begin = [0.0]

    def run(i: int) -> None:
        call, out = factories[i](), latencies[i]
        if barrier.wait() == 0:
            begin[0] = time.perf_counter()
        barrier.wait()
        measure, stop = begin[0] + warmup, begin[0] + warmup + duration
        while (t := time.perf_counter()) < stop:
            call()
            if t >= measure:
                out.append(time.perf_counter() - t)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(factories))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = np.array([x for lat in latencies for x in lat])
    return len(every), every


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpc_http", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("models"))
    p.add_argument("--model", default="fashion-mnist")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per protocol")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds per protocol before measuring")
    p.add_argument("--server-args", default="", help="extra `neuroserve serve` flags")
    args = p.parse_args(argv)

    http_port, grpc_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEUROSERVE_")}
    cmd = [sys.executable, "-m", "service", "serve", "--model-repository", str(args.repository),
           "--host", "127.0.0.1", "--port", str(http_port), "--grpc-port", str(grpc_port),
           *args.server_args.split()]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                print("the server did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.2)
        rng = np.random.default_rng(0)
        print(f"model {args.model}, batch 1, {args.threads} threads, {args.duration:g} s per protocol; "
              f"server: {' '.join(cmd[2:])}")
        print("| protocol | requests | req/s | p50 ms | p99 ms | server CPU ms/req | client CPU ms/req |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, make in (("HTTP binary (tritonclient.http)", _http_call),
                           ("gRPC (tritonclient.grpc)", _grpc_call)):
            port = http_port if make is _http_call else grpc_port
            images = [rng.integers(0, 256, (1, 1, 28, 28), dtype=np.uint8) for _ in range(args.threads)]
            factories = [functools.partial(make, port, args.model, x) for x in images]
            server_cpu, client_cpu, start = cpu_seconds(server.pid), _own_cpu_seconds(), time.perf_counter()
            n, lat = _load(factories, args.warmup, args.duration)
            # CPU over warm-up and measurement, per request at the measured rate over that time.
            calls = n / args.duration * (time.perf_counter() - start)
            print(f"| {name} | {n} | {n / args.duration:,.0f} | {np.percentile(lat, 50) * 1000:.2f} | "
                  f"{np.percentile(lat, 99) * 1000:.2f} | "
                  f"{(cpu_seconds(server.pid) - server_cpu) * 1000 / calls:.3f} | "
                  f"{(_own_cpu_seconds() - client_cpu) * 1000 / calls:.3f} |")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
