"""What tracing costs the serving process, per request, without sockets or a load generator.

    python -m bench.tracing_loop [--model fashion-mnist] [--protocol v2-json] [--pairs 30]

One process builds the app with tracing on (every request sampled, exported to an OTLP/HTTP sink
in another process) and calls it over ASGI, `--concurrency` requests at once, in blocks of
`--block` requests; before each block it switches tracing on or off (`tracing.enabled`, the flag
every transport checks), alternating which comes first. A block's figure is the process's CPU time
per request (event loop, ONNX Runtime and span-packing threads); the difference between the two
blocks of a pair is what tracing cost them, and its median over the pairs cancels the drift of a
shared machine. The exporter process's own CPU per request over all the blocks with tracing on is
reported beside it (summed: one block lasts a few ticks of the kernel's CPU clock).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.executor import ROOT, emit
from bench.servers import cpu_seconds
from bench.workloads import Request, load_workload, requests_for

_SINK = "from bench.tracing import Sink; import time; s = Sink(); print(s.url, flush=True); time.sleep(3600)"


async def _measure(repository: Path, model: str, protocol: str, pairs: int, block: int,
                   concurrency: int, sink_url: str) -> dict:
    from service.observability import tracing
    from service.server.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model_repository=repository, grpc_port=0, workers=1, otlp_endpoint=sink_url))
    requests = requests_for(load_workload(repository / model), protocol)

    async def call(r: Request) -> None:
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": r.body, "more_body": False}
            await asyncio.Event().wait()  # the client never goes away
            return {}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] != 200:
                raise RuntimeError(f"status {message['status']}")

        headers = [(k.lower().encode(), v.encode()) for k, v in r.headers.items()]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": r.path, "raw_path": r.path.encode(), "query_string": b"",
                 "root_path": "", "headers": [*headers, (b"content-length", str(len(r.body)).encode()),
                                              (b"host", b"bench"), (b"user-agent", b"bench")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
        await app(scope, receive, send)

    cost: dict[bool, list[float]] = {False: [], True: []}
    exporter_s: list[float] = []  # per block; summed, as one block is a few clock ticks
    async with app.router.lifespan_context(app):
        while not app.state.service.ready():
            await asyncio.sleep(0.1)
        exporter = tracing._exporter
        if exporter is None:
            raise RuntimeError("tracing did not start")
        for i in range(pairs):
            for on in ((False, True) if i % 2 == 0 else (True, False)):
                tracing.enabled = on
                await asyncio.sleep(2 * exporter.interval_s)  # the last block's records are sent
                before_exporter = cpu_seconds(exporter.process.pid)
                start = time.process_time()
                for n in range(0, block, concurrency):
                    batch = (requests[(n + j) % len(requests)] for j in range(concurrency))
                    await asyncio.gather(*(call(r) for r in batch))
                cost[on].append((time.process_time() - start) / block * 1e6)
                if on:
                    await asyncio.sleep(3 * exporter.interval_s)  # until the exporter has them
                    exporter_s.append(cpu_seconds(exporter.process.pid) - before_exporter)
        tracing.enabled = True
    differences = [on - off for off, on in zip(cost[False], cost[True], strict=True)]
    return {"model": model, "protocol": protocol, "pairs": pairs, "block": block, "concurrency": concurrency,
            "off_us_per_request": round(statistics.median(cost[False]), 1),
            "on_us_per_request": round(statistics.median(cost[True]), 1),
            "tracing_us_per_request": round(statistics.median(differences), 1),
            "exporter_us_per_request": round(sum(exporter_s) / (pairs * block) * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tracing_loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="fashion-mnist")
    p.add_argument("--protocol", default="v2-json")
    p.add_argument("--pairs", type=int, default=30)
    p.add_argument("--block", type=int, default=640)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    sink = subprocess.Popen([sys.executable, "-c", _SINK], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = sink.stdout.readline().strip()
        result = asyncio.run(_measure(args.repository, args.model, args.protocol, args.pairs, args.block,
                                      args.concurrency, url))
    finally:
        sink.kill()
        sink.wait()
    emit(result, "bench.tracing_loop", argv, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
