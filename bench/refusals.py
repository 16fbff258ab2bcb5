"""What one refusal costs the worker: CPU per 429 when a model's queue refuses every request.

    python -m bench.refusals --base REF [--connections 64,2000] [--rounds 3] [--duration 4]

Under overload most requests are refused, and each refusal's cost is taken from the requests the
worker serves (docs/benchmarks.md, "Overload"). To measure that cost alone, the server is started
with `Batcher.refusal` and `Batcher.refuses` replaced by ones that always refuse (here, in the
launcher: the service has no such switch), pinned to CPU 0 with `wrk` on the others; `wrk` sends
fashion-mnist V2 JSON requests over `--connections` keep-alive connections. Reported per variant
and connection count: the median over rounds of refusals a second and of the server's CPU time per
refusal (its `/proc/<pid>/stat` user + system time over the run, divided by the requests `wrk`
counted). The variants (this working tree, and REF from `git archive`) take turns within each
round. `--bare` adds the floor: a uvloop protocol that feeds httptools and writes a fixed 429 for
every request, nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from bench.executor import base_checkout
from bench.load import closed_loop
from bench.overload import parse_cpus, pin
from bench.servers import HOST, Server, _start, free_port
from bench.workloads import load_workload, requests_for

ROOT = Path(__file__).resolve().parents[1]
TICKS_S = os.sysconf("SC_CLK_TCK")

ALWAYS_REFUSE = (
    "from service.core import batching; from service.errors import QueueFull\n"
    "def refusal(self, rows=1, priority=0):\n"
    "    return QueueFull('expected queue wait 250 ms exceeds max_queue_wait_ms 100',"
    " headers={'Retry-After': '1'})\n"
    "batching.Batcher.refusal = refusal\n"
    "batching.Batcher.refuses = lambda self, rows=1, priority=0: True\n"
)


# The least a Python server on uvloop and httptools does per refused request.
BARE = """
import asyncio, sys, httptools, uvloop
REFUSED = (b"HTTP/1.1 429 Too Many Requests\\r\\ncontent-type: application/json\\r\\n"
           b"retry-after: 1\\r\\ncontent-length: 21\\r\\n\\r\\n{\\"code\\":\\"queue_full\\"}")
READY = b"HTTP/1.1 200 OK\\r\\ncontent-length: 0\\r\\n\\r\\n"  # for the readiness probe
class Refuse(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.parser = transport, httptools.HttpRequestParser(self)
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_message_complete(self):
        self.transport.write(REFUSED if self.parser.get_method() == b"POST" else READY)
async def main(port):
    await asyncio.get_running_loop().create_server(Refuse, "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()
uvloop.run(main(int(sys.argv[1])))
"""


def start_bare() -> Server:
    port = free_port()
    return _start("bare", [sys.executable, "-c", BARE, str(port)], port, {}, None, "/v2/health/ready", 60)


def start_refusing(code: Path, repository: Path) -> Server:
    port = free_port()
    launcher = (f"import sys; sys.path.insert(0, {str(code)!r})\n{ALWAYS_REFUSE}"
                "from service.cli import main; sys.exit(main())")
    cmd = [sys.executable, "-c", launcher, "serve", "--model-repository", str(repository.resolve()),
           "--host", HOST, "--port", str(port), "--workers", "1", "--grpc-port", "0"]
    return _start("service", cmd, port, {}, None, "/v2/health/ready", 300)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_S  # utime, stime


def measure(server: Server, request, connections: int, duration_s: float) -> dict:
    before = cpu_seconds(server.proc.pid)
    run = closed_loop(server.port, [request], concurrency=connections, duration_s=duration_s)
    cpu = cpu_seconds(server.proc.pid) - before
    return {"refusals_per_s": run["errors_status"] / run["duration_s"], "requests": run["requests"],
            "ok": run["ok"], "server_cpu_s": cpu, "cpu_us_per_request": cpu / run["requests"] * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refusals", description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="a git ref to compare with")
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="fashion-mnist")
    parser.add_argument("--connections", default="64,2000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--bare", action="store_true", help="also measure the bare uvloop + httptools floor")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    server_cpus = set(parse_cpus(args.server_cpus))
    others = os.sched_getaffinity(0) - server_cpus
    if not others:
        parser.error("leave at least one CPU to wrk")
    os.sched_setaffinity(0, others)
    request = requests_for(load_workload(args.repository / args.model), "v2-json")[0]
    connections = [int(c) for c in args.connections.split(",")]
    runs: dict[str, dict[int, list[dict]]] = {}
    with base_checkout(args.base or "HEAD") as base_code:
        variants: list[tuple[str, Path | None]] = [("this", ROOT)]
        variants += [(args.base, base_code)] if args.base else []
        variants += [("bare", None)] if args.bare else []
        for round_ in range(args.rounds):
            for name, code in variants:
                server = start_bare() if code is None else start_refusing(code, args.repository)
                try:
                    pin([server.proc.pid], args.server_cpus)
                    for c in connections:
                        measure(server, request, c, 2)  # warm-up: connections made, caches filled
                        point = measure(server, request, c, args.duration)
                        if point["ok"]:
                            raise RuntimeError(f"{name}: {point['ok']} requests were not refused")
                        runs.setdefault(name, {}).setdefault(c, []).append(point)
                        print(f"round {round_ + 1} {name} c={c}: {point['refusals_per_s']:.0f} refusals/s, "
                              f"{point['cpu_us_per_request']:.1f} µs CPU each", flush=True)
                finally:
                    server.stop()
    summary = {name: {c: {"refusals_per_s": statistics.median(p["refusals_per_s"] for p in points),
                          "cpu_us_per_refusal": statistics.median(p["cpu_us_per_request"] for p in points)}
                      for c, points in by_c.items()}
               for name, by_c in runs.items()}
    for name, by_c in summary.items():
        for c, s in by_c.items():
            print(f"{name} c={c}: median {s['refusals_per_s']:.0f} refusals/s, "
                  f"{s['cpu_us_per_refusal']:.1f} µs CPU a refusal")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m bench.refusals " + " ".join(argv or sys.argv[1:])
        result = {"command": command, "model": args.model, "summary": summary, "runs": runs}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
