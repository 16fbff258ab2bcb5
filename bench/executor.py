"""Front-ends and the executor: what the process split costs and what it buys.

    python -m bench.executor transport              # tensor transport: frames vs pickle, µs/round trip
    python -m bench.executor compare --base REF     # V2 JSON c=64 and c=1 against REF's service
    python -m bench.executor memory --base REF      # USS per process as front-ends are added
    python -m bench.executor simulated              # a simulated device behind 1 and 2 front-ends
    python -m bench.executor gpu --workers 4        # on a GPU: V2 binary c=256 vs ORT's CUDA ceiling

Every command prints JSON (and `--out FILE` writes it). `compare` and `memory` run the service of
git ref REF (extracted with `git archive` into a temporary folder, run with this venv) beside this
checkout's, interleaved, so both see the same machine; medians over `--reps`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.load import closed_loop
from bench.servers import HOST, Server, _start, free_port, listening_sockets, start_reference
from bench.simulated_device import ceiling
from bench.workloads import load_workload, model_file, requests_for

ROOT = Path(__file__).resolve().parents[1]


# -- transport --------------------------------------------------------------------------------------

TRANSPORT_CASES = {  # name: arrays of one request
    "fashion-mnist, 1 image (784 B)": {"pixels": np.zeros((1, 1, 28, 28), np.uint8)},
    "spoken-digits, 1 clip (64 KiB)": {"waveform": np.zeros((1, 16000), np.float32)},
    "fashion-mnist, 128 images (98 KiB)": {"pixels": np.zeros((128, 1, 28, 28), np.uint8)},
    "spoken-digits, 128 clips (7.8 MiB)": {"waveform": np.zeros((128, 16000), np.float32)},
}


def _echo(address: str, stop: threading.Event) -> None:
    """The executor's side: decode what arrives, encode it back (as replies carry outputs)."""
    import zmq

    from service.core import wire

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(address)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if not poller.poll(100):
            continue
        frames = sock.recv_multipart(copy=False)
        peer, kind = frames[0].bytes, frames[1].bytes
        if kind == b"frames":
            header = wire.decode_reply(frames[2].buffer)
            arrays = wire.arrays(header.outputs, frames[3:])
            metas, out = wire.tensors(arrays)
            sock.send_multipart([peer, kind, wire.encode(wire.Reply(0, outputs=metas)), *out],
                                copy=not wire.zero_copy(out))
        else:
            arrays = pickle.loads(frames[2].buffer)
            sock.send_multipart([peer, kind, pickle.dumps(arrays, protocol=5)])
    sock.close(0)


def transport(iterations: int) -> dict:
    import zmq

    from service.core import wire

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-ipc-") as tmp:
        address = f"ipc://{tmp}/echo.sock"
        stop = threading.Event()
        server = threading.Thread(target=_echo, args=(address, stop), daemon=True)
        server.start()
        client = zmq.Context.instance().socket(zmq.DEALER)
        client.connect(address)
        for case, arrays in TRANSPORT_CASES.items():
            row = {}
            n = iterations if sum(a.nbytes for a in arrays.values()) < 1 << 20 else max(20, iterations // 20)
            for kind in ("frames", "pickle"):
                times = []
                for _ in range(n):
                    t = time.perf_counter()
                    if kind == "frames":
                        metas, frames = wire.tensors(arrays)
                        client.send_multipart([b"frames", wire.encode(wire.Reply(0, outputs=metas)), *frames],
                                              copy=not wire.zero_copy(frames))
                        reply = client.recv_multipart(copy=False)
                        wire.arrays(wire.decode_reply(reply[1].buffer).outputs, reply[2:])
                    else:
                        client.send_multipart([b"pickle", pickle.dumps(arrays, protocol=5)])
                        reply = client.recv_multipart(copy=False)
                        pickle.loads(reply[1].buffer)
                    times.append(time.perf_counter() - t)
                row[kind] = {"median_us": round(statistics.median(times) * 1e6, 1), "n": n}
            results[case] = row
        stop.set()
        client.close(0)
    return {"command": "transport", "iterations": iterations, "results": results}


# -- service variants -----------------------------------------------------------------------------------


@contextlib.contextmanager
def base_checkout(ref: str) -> Iterator[Path]:
    """REF's files (not its models: the same models/ serve both) in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="bench-base-") as tmp:
        archive = subprocess.run(["git", "archive", ref, "service"], cwd=ROOT, capture_output=True,
                                 check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield Path(tmp)


def start(code: Path, repository: Path, workers: int, extra: list[str] | None = None,
          env: dict[str, str] | None = None) -> Server:
    """`python -m service serve` from `code` (this checkout or a base ref's), HTTP only."""
    port = free_port()
    # `code` first on the path; spawned workers inherit the parent's path.
    launcher = (f"import sys; sys.path.insert(0, {str(code)!r}); "
                "from service.cli import main; sys.exit(main())")
    cmd = [sys.executable, "-c", launcher, "serve", "--model-repository", str(repository.resolve()),
           "--host", HOST, "--port", str(port), "--workers", str(workers), "--grpc-port", "0", *(extra or [])]
    server = _start("service", cmd, port, env or {}, None, "/v2/health/ready", 300)
    deadline = time.monotonic() + 120
    while listening_sockets(port) < workers and time.monotonic() < deadline:
        time.sleep(0.2)
    return server


def compare(base: str, repository: Path, model: str, duration: float, reps: int) -> dict:
    w = load_workload(repository / model)
    requests = requests_for(w, "v2-json")
    points: dict[str, dict[int, list[dict]]] = {}
    with base_checkout(base) as base_code:
        variants = [
            (f"{base} --workers 2", base_code, 2, []),
            ("this --workers 2 (executor process)", ROOT, 2, []),
            ("this --workers 1 (in-process)", ROOT, 1, []),
        ]
        for _ in range(reps):
            for name, code, workers, extra in variants:
                server = start(code, repository, workers, extra)
                try:
                    closed_loop(server.port, requests, concurrency=64, duration_s=3)  # warm-up
                    for c in (64, 1):
                        points.setdefault(name, {}).setdefault(c, []).append(
                            closed_loop(server.port, requests, concurrency=c, duration_s=duration))
                finally:
                    server.stop()
            ref = start_reference(model_file(repository / model), model, workers=1, ort_threads=1)
            try:
                closed_loop(ref.port, requests, concurrency=1, duration_s=3)
                points.setdefault("plain FastAPI + ORT reference, 1 worker", {}).setdefault(1, []).append(
                    closed_loop(ref.port, requests, concurrency=1, duration_s=duration))
            finally:
                ref.stop()
    summary = {name: {str(c): {"rps": statistics.median(p["rps"] for p in runs),
                               "p50_ms": statistics.median(p["p50_ms"] for p in runs),
                               "p99_ms": statistics.median(p["p99_ms"] for p in runs),
                               "errors": sum(p["errors"] for p in runs)}
                      for c, runs in by_c.items()}
               for name, by_c in points.items()}
    return {"command": "compare", "base": base, "model": model, "protocol": "v2-json",
            "duration_s": duration, "reps": reps, "medians": summary}


def uss_mib(pid: int) -> float:
    """Unique set size: the memory only this process holds (private clean + dirty pages)."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total / 1024


def _processes(server: Server) -> dict[int, str]:
    out = {}
    for pid in server.worker_pids():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        out[pid] = "executor" if comm == "neuroserve-exec" else "front-end"
    return out


def memory(base: str, repository: Path, worker_counts: list[int]) -> dict:
    rows = []
    samples = {}
    for model_dir in sorted(p for p in repository.iterdir() if (p / "config.toml").is_file()):
        samples[model_dir.name] = requests_for(load_workload(model_dir, n=8), "v2-json", 8)
    with base_checkout(base) as base_code:
        for name, code in ((base, base_code), ("this", ROOT)):
            for workers in worker_counts:
                server = start(code, repository, workers)
                try:
                    for requests in samples.values():  # every model has served: arenas allocated
                        closed_loop(server.port, requests, concurrency=4, duration_s=2)
                    time.sleep(1)
                    procs = _processes(server)
                    uss = {pid: uss_mib(pid) for pid in procs}
                    rows.append({"code": name, "workers": workers,
                                 "front_ends_mib": sorted(round(uss[p], 1) for p, k in procs.items()
                                                          if k == "front-end"),
                                 "executor_mib": [round(uss[p], 1) for p, k in procs.items()
                                                  if k == "executor"],
                                 "total_mib": round(sum(uss.values()), 1)})
                finally:
                    server.stop()
    return {"command": "memory", "base": base, "rows": rows}


def simulated(repository: Path, model: str, a_ms: float, b_ms: float, batch: int, concurrency: int,
              front_ends: list[int], duration: float, reps: int) -> dict:
    """V2 binary at `concurrency` against the simulated device, model config with `batch` rows."""
    env = {"NEUROSERVE_RUNTIME_FACTORY": "bench.simulated_device:SimulatedRuntime",
           "BENCH_DEVICE_A_MS": str(a_ms), "BENCH_DEVICE_B_MS": str(b_ms)}
    w = load_workload(repository / model)
    requests = requests_for(w, "v2-binary")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        repo = Path(tmp)
        _copy_with_batching(repository / model, repo / model, batch, queue=max(4 * concurrency, 2 * batch))
        for n in front_ends:
            runs = []
            for _ in range(reps):
                server = start(ROOT, repo, n, ["--executor", "process"], env=env)
                try:
                    closed_loop(server.port, requests, concurrency=concurrency, duration_s=3)
                    runs.append(closed_loop(server.port, requests, concurrency=concurrency,
                                            duration_s=duration))
                finally:
                    server.stop()
            rps = statistics.median(r["rps"] for r in runs)
            share = rps / ceiling(batch, a_ms / 1000, b_ms / 1000)
            rows.append({"front_ends": n, "rps": round(rps), "share_of_ceiling": round(share, 3),
                         "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                         "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                         "errors": sum(r["errors"] for r in runs)})
    return {"command": "simulated", "model": model, "protocol": "v2-binary", "a_ms": a_ms, "b_ms": b_ms,
            "batch": batch, "concurrency": concurrency, "ceiling_rows_per_s": round(ceiling(
                batch, a_ms / 1000, b_ms / 1000)), "duration_s": duration, "reps": reps, "rows": rows}


def gpu(repository: Path, models: list[str], workers: int, concurrency: int, duration: float,
        reps: int) -> dict:
    """On a GPU: each model's ceiling (ORT in process, CUDA, batch 128) and the service (executor
    process, `workers` front-ends, V2 binary at `concurrency`) measured in the same run, and the
    processes holding a CUDA context while the service runs (one is the goal: the executor)."""
    from bench import raw_ort

    rows = []
    for model in models:
        w = load_workload(repository / model, n=256)
        ceiling_run = raw_ort.run(w, model_file(repository / model), threads=1, batch_sizes=(128,),
                                  duration_s=duration, provider="cuda")
        requests = requests_for(w, "v2-binary")
        runs, contexts = [], []
        for _ in range(reps):
            server = start(ROOT, repository, workers, ["--providers", "cuda", "--executor", "process"])
            try:
                closed_loop(server.port, requests, concurrency=concurrency, duration_s=3)
                query = ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                         "--format=csv,noheader"]
                contexts = subprocess.run(query, capture_output=True, text=True,
                                          check=False).stdout.strip().splitlines()
                runs.append(closed_loop(server.port, requests, concurrency=concurrency, duration_s=duration))
            finally:
                server.stop()
        rps = statistics.median(r["rps"] for r in runs)
        top = ceiling_run["best_samples_per_s"]
        rows.append({"model": model, "ceiling_samples_per_s": round(top),
                     "service_rps": round(rps), "share_of_ceiling": round(rps / top, 3),
                     "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                     "errors": sum(r["errors"] for r in runs), "cuda_contexts": contexts})
    return {"command": "gpu", "workers": workers, "concurrency": concurrency, "protocol": "v2-binary",
            "duration_s": duration, "reps": reps, "rows": rows}


def _copy_with_batching(src: Path, dst: Path, batch: int, queue: int) -> None:
    import re
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    config = (dst / "config.toml").read_text()
    config = re.sub(r"(?m)^max_batch_size\s*=.*$", f"max_batch_size = {batch}", config)
    config = re.sub(r"(?m)^max_queue_size\s*=.*$", f"max_queue_size = {queue}", config)
    config = re.sub(r"(?ms)^\[batching\.cuda\].*?(?=^\[|\Z)", "", config)
    (dst / "config.toml").write_text(config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.executor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("transport")
    t.add_argument("--iterations", type=int, default=2000)
    for name in ("compare", "memory"):
        s = sub.add_parser(name)
        s.add_argument("--base", required=True, help="git ref whose service to compare with")
        s.add_argument("--repository", type=Path, default=ROOT / "models")
    c = sub.choices["compare"]
    c.add_argument("--model", default="fashion-mnist")
    c.add_argument("--duration", type=float, default=10)
    c.add_argument("--reps", type=int, default=3)
    sub.choices["memory"].add_argument("--workers", default="1,2,3")
    m = sub.add_parser("simulated")
    m.add_argument("--repository", type=Path, default=ROOT / "models")
    m.add_argument("--model", default="fashion-mnist")
    m.add_argument("--a-ms", type=float, default=1.0)
    m.add_argument("--b-ms", type=float, default=0.01)
    m.add_argument("--batch", type=int, default=128)
    m.add_argument("--concurrency", type=int, default=256)
    m.add_argument("--front-ends", default="1,2")
    m.add_argument("--duration", type=float, default=10)
    m.add_argument("--reps", type=int, default=3)
    g = sub.add_parser("gpu")
    g.add_argument("--repository", type=Path, default=ROOT / "models")
    g.add_argument("--models", default="sentiment,spoken-digits")
    g.add_argument("--workers", type=int, default=4)
    g.add_argument("--concurrency", type=int, default=256)
    g.add_argument("--duration", type=float, default=10)
    g.add_argument("--reps", type=int, default=1)
    for s in sub.choices.values():
        s.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.cmd == "transport":
        result = transport(args.iterations)
    elif args.cmd == "compare":
        result = compare(args.base, args.repository, args.model, args.duration, args.reps)
    elif args.cmd == "memory":
        result = memory(args.base, args.repository, [int(x) for x in args.workers.split(",")])
    elif args.cmd == "gpu":
        result = gpu(args.repository, args.models.split(","), args.workers, args.concurrency, args.duration,
                     args.reps)
    else:
        result = simulated(args.repository, args.model, args.a_ms, args.b_ms, args.batch, args.concurrency,
                           [int(x) for x in args.front_ends.split(",")], args.duration, args.reps)
    emit(result, "bench.executor", argv, args.out)
    return 0


def emit(result: dict, module: str, argv: list[str] | None, out: Path | None) -> None:
    """Print a benchmark's JSON result with the command that produced it, and write it to `out`."""
    result["argv"] = ["python", "-m", module, *(argv if argv is not None else sys.argv[1:])]
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
