"""The whole benchmark in one run: raw ORT ceilings, then every server configuration under load.

Everything that is compared is measured in the same run and interleaved: for each repetition, for
each load point, every configuration runs once (in an order rotated per repetition), so slow drift
of a shared machine hits all configurations alike. The report takes medians over repetitions.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import load, metrics, raw_ort, servers
from bench.workloads import Workload, find_models, load_workload, model_file, raw_workload, requests_for

FULL_CONCURRENCIES = (1, 8, 32, 64, 128)
QUICK_CONCURRENCIES = (1, 32, 64)


@dataclass
class Plan:
    repository: Path = Path("models")
    models: list[str] | None = None
    workers: int = 1
    ort_threads: int | None = None  # per worker; default: cores / workers
    provider: str = "cpu"  # ONNX Runtime's execution provider on every side: "cpu" or "cuda"
    concurrencies: tuple[int, ...] = FULL_CONCURRENCIES
    open_rate_fractions: tuple[float, ...] = (0.3, 0.6, 0.9)
    max_open_rate: float = 2000.0  # the asyncio client's own limit on this machine
    duration_s: float = 10.0
    warmup_s: float = 2.0
    reps: int = 3
    raw_duration_s: float = 2.0
    raw_batch_sizes: tuple[int, ...] = raw_ort.DEFAULT_BATCH_SIZES
    protocols: tuple[str, ...] = ("v2-json", "v2-binary", "task")
    reference: bool = True
    service: bool = True
    out: Path = Path("docs/benchmarks")
    results_name: str = "results.json"
    command: str = ""
    log: bool = True
    extra: dict = field(default_factory=dict)

    def threads_per_worker(self) -> int:
        return self.ort_threads or max(1, (os.cpu_count() or 1) // self.workers)


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    return {
        "nproc": os.cpu_count(), "cpu": cpu or platform.processor(), "mem_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(), "platform": platform.platform(),
        # The module's own version: onnxruntime and onnxruntime-gpu install the same module.
        "onnxruntime": _ort_version(), "fastapi": _version("fastapi"),
        "uvicorn": _version("uvicorn"), "wrk": _wrk_version(), "gpu": _gpu(),
    }


def _gpu() -> str:
    """The GPU's name and driver as nvidia-smi reports them; empty on a machine without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return ""


def _wrk_version() -> str:
    try:
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
        return out.split("\n")[0].split(" Copyright")[0].strip()
    except OSError:
        return ""


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def _say(plan: Plan, msg: str) -> None:
    if plan.log:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Config:
    """One thing under load: a server and the protocol spoken to it."""

    server: str  # "reference" | "service"
    protocol: str

    @property
    def label(self) -> str:
        return f"{self.server}/{self.protocol}"


def _point(plan: Plan, w: Workload, cfg: Config, srv: servers.Server, reqs: list, *, rep: int,
           running: list[servers.Server], concurrency: int | None = None, rate: float | None = None,
           duration: float | None = None, record: bool = True) -> dict:
    """One load point on `srv`, once every server in `running` has finished the previous one's work."""
    duration = duration or plan.duration_s
    settle_s = servers.wait_idle(running)
    before = metrics.parse(metrics.scrape(srv.base_url)) if cfg.server == "service" else None
    cpu_before, loop_before, wall_before = srv.cpu_seconds(), srv.loop_cpu_seconds(), time.monotonic()
    if rate is None:
        res = load.closed_loop(srv.port, reqs, concurrency=concurrency or 1, duration_s=duration)
    else:
        res = load.open_loop(srv.port, reqs, rate=rate, duration_s=duration, seed=rep)
    server_cpu_s, loop_cpu_s = srv.cpu_seconds() - cpu_before, srv.loop_cpu_seconds() - loop_before
    wall_s = time.monotonic() - wall_before
    ms_per_request = 1e3 / max(1, res["requests"])
    # Server CPU per request is far steadier than requests/s on a shared machine.
    res["server_cpu_ms_per_request"] = server_cpu_s * ms_per_request
    res["server_loop_cpu_ms_per_request"] = loop_cpu_s * ms_per_request
    res["client_cpu_ms_per_request"] = res["client_cpu_s"] * ms_per_request
    # Server and load generator share the cores: near 1, the machine itself is the limit.
    res["cpu_busy"] = (server_cpu_s + res["client_cpu_s"]) / (wall_s * (os.cpu_count() or 1))
    if before is not None:
        after = metrics.parse(metrics.scrape(srv.base_url))
        res["server_metrics"] = metrics.delta(before, after, w.model)
    res.update(model=w.model, config=cfg.label, server=cfg.server, protocol=cfg.protocol, rep=rep,
               workers=srv.info.get("workers"), rss_mib=list(srv.rss_mib().values()), settle_s=settle_s)
    if record:
        x = f"c={concurrency}" if rate is None else f"rate={rate:.0f}/s"
        _say(plan, f"{w.model:14s} {cfg.label:18s} {x:12s} rep {rep}: {res['rps']:8.1f} req/s  "
                   f"p50 {res['p50_ms']:7.2f}  p99 {res['p99_ms']:7.2f} ms  errors {res['errors']}  "
                   f"server CPU {res['server_cpu_ms_per_request']:.3f} ms/req "
                   f"(event loop {res['server_loop_cpu_ms_per_request']:.3f}), "
                   f"client {res['client_cpu_ms_per_request']:.3f}, cores busy {res['cpu_busy']:.0%}, "
                   f"after {settle_s:.1f} s for the servers to go idle")
    return res


def run(plan: Plan) -> dict:
    """Run the plan; write and return the results (raw JSON in `plan.out`)."""
    started = time.time()
    model_dirs = [d for d in find_models(plan.repository) if not plan.models or d.name in plan.models]
    if not model_dirs:
        raise SystemExit(f"no models in {plan.repository}")
    results: dict = {
        "meta": {
            "command": plan.command, "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git_commit": _git_commit(), "machine": machine(), "loadavg_start": os.getloadavg(),
            "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
            "ort_threads_per_worker": plan.threads_per_worker(),
        },
        "workloads": {}, "raw": {}, "points": [], "memory": {},
    }
    workloads = {d.name: load_workload(d) for d in model_dirs}
    for d in model_dirs:
        w = workloads[d.name]
        results["workloads"][w.model] = {"source": w.source, "task": w.task,
                                         "inputs": [asdict(s) for s in w.inputs]}
        _say(plan, f"raw ORT {w.model} ({os.cpu_count()} threads, {plan.provider})")
        results["raw"][w.model] = raw_ort.run(raw_workload(d), model_file(d), threads=os.cpu_count(),
                                              batch_sizes=plan.raw_batch_sizes,
                                              duration_s=plan.raw_duration_s, provider=plan.provider)
        if plan.workers > 1 or plan.threads_per_worker() != os.cpu_count():
            per_worker = raw_ort.run(w, model_file(d), threads=plan.threads_per_worker(),
                                     batch_sizes=(1,), duration_s=plan.raw_duration_s,
                                     provider=plan.provider)
            results["raw"][w.model]["per_worker_threads_batch1"] = per_worker["points"][0]

    service = None
    if plan.service and servers.service_available():
        _say(plan, f"starting the service ({plan.workers} workers)")
        service = servers.start_service(plan.repository, workers=plan.workers, log_dir=plan.out / "logs",
                                        extra_args=["--providers", plan.provider])
        results["memory"]["service_idle_rss_mib"] = list(service.rss_mib().values())
    elif plan.service:
        results["meta"]["note"] = "service not available: only the reference server was measured"
    try:
        for d in model_dirs:
            _run_model(plan, workloads[d.name], d, service, results)
        if service is not None:
            results["memory"]["service_end_rss_mib"] = list(service.rss_mib().values())
    finally:
        if service is not None:
            service.stop()
    results["meta"]["loadavg_end"] = os.getloadavg()
    results["meta"]["elapsed_s"] = round(time.time() - started, 1)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / plan.results_name).write_text(json.dumps(results, indent=1, default=float))
    _say(plan, f"results in {plan.out / plan.results_name}")
    return results


class _Ceiling:
    """The raw ORT figure at the best batch size, measured again before each repetition's load
    points, so that the service is compared with a ceiling taken under the same machine conditions
    (the sweep at the start of the run can fall in a busier or a quieter minute than the load)."""

    def __init__(self, model_dir: Path, raw: dict, plan: Plan) -> None:
        self.raw = raw
        self.workload = raw_workload(model_dir)
        self.session = raw_ort.session(model_file(model_dir), raw["ort_threads"], raw.get("provider", "cpu"))
        raw["interleaved"] = {"batch_size": raw["best_batch_size"], "samples_per_s": [], "settle_s": []}

    def measure(self, plan: Plan, running: list[servers.Server]) -> None:
        self.raw["interleaved"]["settle_s"].append(servers.wait_idle(running))
        point = raw_ort.measure(self.session, self.workload, self.raw["best_batch_size"],
                                duration_s=plan.raw_duration_s)
        self.raw["interleaved"]["samples_per_s"].append(point["samples_per_s"])
        _say(plan, f"{self.workload.model:14s} raw ORT batch {point['batch_size']}: "
                   f"{point['samples_per_s']:8.1f} samples/s")


def _run_model(plan: Plan, w: Workload, model_dir: Path, service: servers.Server | None,
               results: dict) -> None:
    ref = None
    try:
        if plan.reference:
            ref = servers.start_reference(model_file(model_dir), w.model, workers=plan.workers,
                                          ort_threads=plan.threads_per_worker(), provider=plan.provider,
                                          log_dir=plan.out / "logs")
            results["memory"].setdefault("reference_idle_rss_mib", {})[w.model] = list(ref.rss_mib().values())
        targets: list[tuple[Config, servers.Server, list]] = []
        if ref is not None:
            targets.append((Config("reference", "v2-json"), ref, requests_for(w, "v2-json")))
        if service is not None:
            for proto in plan.protocols:
                reqs = requests_for(w, proto)
                targets.append((Config("service", proto), service, reqs))
        running = list({id(srv): srv for _, srv, _ in targets}.values())
        for cfg, srv, reqs in targets if plan.warmup_s > 0 else []:  # warm-up, not recorded
            _point(plan, w, cfg, srv, reqs, rep=-1, running=running, concurrency=8,
                   duration=plan.warmup_s, record=False)
        closed = []
        raw = results["raw"].get(w.model)
        ceiling = _Ceiling(model_dir, raw, plan) if raw and targets else None
        for rep in range(plan.reps):
            if ceiling is not None:
                ceiling.measure(plan, running)
            for c in plan.concurrencies:
                order = targets[rep % len(targets):] + targets[:rep % len(targets)]
                for cfg, srv, reqs in order:
                    closed.append(_point(plan, w, cfg, srv, reqs, rep=rep, running=running, concurrency=c))
        results["points"] += closed
        if not plan.open_rate_fractions or not closed:
            return
        peak = max(p["rps"] for p in closed)
        rates = sorted({round(min(plan.max_open_rate, f * peak), 0) for f in plan.open_rate_fractions} - {0})
        for rep in range(plan.reps):
            for rate in rates:
                order = targets[rep % len(targets):] + targets[:rep % len(targets)]
                for cfg, srv, reqs in order:
                    results["points"].append(_point(plan, w, cfg, srv, reqs, rep=rep, running=running,
                                                    rate=rate))
    finally:
        if ref is not None:
            ref.stop()
