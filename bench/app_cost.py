"""CPU time per V2 infer request inside the application, driven over ASGI in process (no sockets, no
load generator): two git refs' services, interleaved.

    python -m bench.app_cost --base REF --this REF [--rounds 3] [--repeats 5] [--requests 1280]

Each round runs, for each ref in turn (which goes first alternates), a fresh process that builds
the app (`create_app`, one worker, in-process models, no gRPC), waits until it is ready and calls it
directly with fashion-mnist V2 JSON and binary requests, one at a time (c=1) and 64 at once (c=64).
A point is the process's CPU time (event loop and ONNX Runtime thread together) over `--requests`
requests, the best of `--repeats`. On a shared machine this drifts far less than requests/s over
sockets does. Prints JSON: per ref and point the median over rounds, in µs per request, and this
ref's as a ratio of REF's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.executor import ROOT, base_checkout

POINTS = [(p, c) for p in ("v2-json", "v2-binary") for c in (1, 64)]
READY_TIMEOUT_S = 120


async def _measure(repository: Path, model: str, repeats: int, n: int) -> dict[str, float]:
    from bench.workloads import load_workload, requests_for
    from service.server.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model_repository=repository, grpc_port=0, workers=1))
    w = load_workload(repository / model)

    async def call(body: bytes, path: str, headers: dict[str, str]) -> None:
        sent = False
        status: list[int] = []

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never goes away
            return {}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": [*raw, (b"content-length", str(len(body)).encode()),
                                              (b"host", b"bench")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
        await app(scope, receive, send)
        if status != [200]:
            raise RuntimeError(f"{path}: status {status}")

    out: dict[str, float] = {}
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not app.state.service.ready():
            if time.monotonic() > deadline:  # e.g. an older ref that cannot read today's config
                raise RuntimeError(f"{model} not ready after {READY_TIMEOUT_S} s")
            await asyncio.sleep(0.1)
        for protocol, c in POINTS:
            requests = requests_for(w, protocol)
            best = float("inf")
            for _ in range(repeats):
                start = time.process_time()
                for i in range(0, n, c):
                    await asyncio.gather(*(call(r.body, r.path, r.headers)
                                           for r in (requests[(i + j) % len(requests)] for j in range(c))))
                best = min(best, (time.process_time() - start) / n)
            out[f"{protocol} c={c}"] = round(best * 1e6, 1)
    return out


def _run(code: Path, repository: Path, model: str, repeats: int, n: int) -> dict[str, float]:
    """One measuring process with `code`'s service first on the path (and this checkout's bench)."""
    launcher = (f"import sys; sys.path[:0] = [{str(code)!r}, {str(ROOT)!r}]; import asyncio, json; "
                "from pathlib import Path; from bench.app_cost import _measure; "
                f"print('RESULT', json.dumps(asyncio.run(_measure(Path({str(repository)!r}), "
                f"{model!r}, {repeats}, {n}))))")
    proc = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"no result (rc {proc.returncode}): {proc.stderr[-1000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.app_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git ref to compare with")
    p.add_argument("--this", required=True, help="git ref to measure")
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="fashion-mnist")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--requests", type=int, default=1280)
    args = p.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    with base_checkout(args.base) as base_code, base_checkout(args.this) as this_code:
        for i in range(args.rounds):
            order = [("base", base_code), ("this", this_code)]
            for name, code in order if i % 2 == 0 else reversed(order):
                runs[name].append(_run(code, args.repository.resolve(), args.model, args.repeats,
                                       args.requests))
    medians = {point: {name: statistics.median(r[point] for r in rs) for name, rs in runs.items()}
               for point in runs["base"][0]}
    for m in medians.values():
        m["ratio"] = round(m["this"] / m["base"], 3)
    result = {"base": args.base, "this": args.this, "model": args.model, "unit": "CPU µs per request",
              "medians": medians, "runs": runs,
              "argv": ["python", "-m", "bench.app_cost", *(argv if argv is not None else sys.argv[1:])]}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
