"""Open-loop overload: what a server does with 1× and 4× the load it can serve.

    python -m bench.overload --repository models --model fashion-mnist --base REF [--ref REF2]

For this working tree (or REF2) and for REF (their `service/` from `git archive`, run with this
venv, on the same models), each with one worker (or `--workers`): capacity is the closed-loop
throughput of `wrk` (32 connections); then `wrk` with `paced.lua` offers `factor` × capacity for
`--duration` seconds (V2 JSON, one image a request): `--connections` keep-alive connections, each
pausing an exponential think time between an answer and its next request, its mean set so that the
connections together send at the asked rate. With think times long beside the answers this is open
loop enough (a slow answer delays only its own connection's next request), and `wrk` is C: on this
2-core machine a Python client could not send 4× beside the server (tried: three uvloop processes
sent 4,700 of 10,000 requests a second, lagging seconds behind schedule), and Debian's `hey -q`
ticks all its workers in step, sending bursts. `offered_rps` is what was sent, not what was asked
for.

Reported per point: offered rate, goodput (200s a second) as a share of capacity, refusals (non-2xx:
429 here) and socket errors, the latency of every answer as `wrk` saw it (refusals included), and
the server's own time for each admitted (200) request, from its `Server-Timing` total counted by
`paced.lua` in 0.5 ms steps, against the bound the model sets (its `max_queue_wait_ms` and the mean
compute time of a batch), and from the server's Prometheus histograms the same time and the queue
time (percentiles interpolated within their buckets). Where the server's CPU went over the point:
its share busy, its event loops' share (the rest is the compute threads and decoding pool), how
long its CPUs stood idle — goodput lost while idle was lost to refusing too much, not to the cost
of refusing — and its rejections by reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench import metrics as server_metrics
from bench.executor import base_checkout, start
from bench.load import closed_loop, write_manifest, wrk_result
from bench.servers import HOST, Server
from bench.workloads import Request, load_workload, requests_for
from service.core.model_config import load_model_config

ROOT = Path(__file__).resolve().parents[1]
PACED_LUA = Path(__file__).with_name("paced.lua")


def paced(port: int, request: Request, *, rate: float, duration_s: float, connections: int) -> dict:
    """`wrk` with `connections` connections thinking `connections / rate` seconds on average."""
    with tempfile.TemporaryDirectory(prefix="bench-paced-") as tmp:
        manifest = write_manifest(Path(tmp), [request])
        think_ms = connections / rate * 1000
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout=10s",
               "-s", str(PACED_LUA), f"http://{HOST}:{port}/", "--", str(manifest), f"{think_ms:.3f}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    raw = wrk_result(proc)
    duration = raw["duration_us"] / 1e6
    ok = raw["requests"] - raw["status"]
    admitted, queued = admitted_timings(proc.stdout, "counts"), admitted_timings(proc.stdout, "queued")
    return {
        "asked_rps": rate, "connections": connections, "think_ms": think_ms, "duration_s": duration,
        "sent": raw["requests"], "offered_rps": raw["requests"] / duration, "ok": ok,
        "goodput_rps": ok / duration, "refused": raw["status"],
        "socket_errors": raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        "all_p50_ms": raw["p50_us"] / 1e3, "all_p99_ms": raw["p99_us"] / 1e3,
        "admitted_timed": admitted[-1][1] if admitted else 0,
        "admitted_p50_ms": server_metrics.quantile(dict(admitted), 0.5),
        "admitted_p99_ms": server_metrics.quantile(dict(admitted), 0.99),
        "admitted_queue_p50_ms": server_metrics.quantile(dict(queued), 0.5),
        "admitted_queue_p99_ms": server_metrics.quantile(dict(queued), 0.99),
        "admitted_over": {f"{ms:g}": admitted[-1][1] - at_most(admitted, ms) for ms in (100, 110, 125, 150)}
        if admitted else {},
    }


def at_most(cumulative: list[tuple[float, float]], ms: float) -> float:
    """Answers counted at or under `ms`."""
    return max((n for le, n in cumulative if le <= ms), default=0)


def admitted_timings(stdout: str, key: str) -> list[tuple[float, float]]:
    """Cumulative counts (upper bound in ms, answers) of the 200s' `Server-Timing` totals
    (`counts`) or queue times (`queued`) that `paced.lua` counted in steps."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRKADMITTED ")), None)
    if line is None:
        return []
    raw = json.loads(line[len("WRKADMITTED "):])
    step, total, cumulative = raw["step_ms"], 0, []
    for index, n in sorted((int(k), v) for k, v in raw[key].items()):
        total += n
        cumulative.append(((index + 1) * step, total))
    return cumulative


def admitted_durations(text: str | None, model: str) -> dict[float, float]:
    """Cumulative buckets of the end-to-end time of `model`'s requests answered 200."""
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text or ""):
        if family.name != "neuroserve_request_duration_seconds":
            continue
        for s in family.samples:
            labels = s.labels
            if s.name.endswith("_bucket") and labels.get("model") == model and labels.get("code") == "200":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    return buckets


def wait_bound_s(text: str | None, model: str) -> float:
    """The queue's admission bound when scraped (`neuroserve_queue_wait_bound_seconds`; NaN if the
    server has none)."""
    for family in text_string_to_metric_families(text or ""):
        if family.name == "neuroserve_queue_wait_bound_seconds":
            for s in family.samples:
                if s.labels.get("model") == model:
                    return s.value
    return math.nan


def cpu_idle_s(cpus: list[int]) -> float:
    """Idle seconds so far of `cpus` (idle + iowait in /proc/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    idle = 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            idle += (int(fields[3]) + int(fields[4])) / tick
    return idle


def rejections(text: str | None, model: str) -> dict[str, float]:
    """`neuroserve_rejections_total` of `model` by reason."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text or ""):
        if family.name == "neuroserve_rejections":
            for s in family.samples:
                if s.name.endswith("_total") and s.labels.get("model") == model:
                    out[s.labels["reason"]] = out.get(s.labels["reason"], 0.0) + s.value
    return out


def cpu_sample(server: Server, cpus: list[int]) -> tuple[float, float, float, float]:
    """(the server's CPU seconds, its event loops' CPU seconds, idle seconds of `cpus`, now)."""
    return server.cpu_seconds(), server.loop_cpu_seconds(), cpu_idle_s(cpus), time.monotonic()


def cpu_use(before: tuple, after: tuple, n_cpus: int) -> dict[str, float]:
    """Where the server's CPUs went between two samples, as shares of them: busy with the server,
    with its event loops (the rest is the compute threads and decoding pool), and idle (work lost
    while idle was lost to refusing too much, not to the cost of refusing)."""
    cpu, loop_cpu, idle, wall = (b - a for a, b in zip(before, after, strict=True))
    return {"server_cpu_busy": cpu / wall / n_cpus, "server_loop_cpu_share": loop_cpu / wall / n_cpus,
            "server_cpus_idle": idle / wall / n_cpus}


def pin(pids: list[int], cpus: str) -> None:
    """Every thread of `pids` onto `cpus` (`taskset -a`: threads started since inherit it)."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, capture_output=True)


def run_variant(code: Path, repository: Path, model: str, factors: list[float], duration_s: float,
                capacity_s: float, connections: int, server_cpus: str | None = None,
                workers: int = 1) -> dict:
    w = load_workload(repository / model)
    request = requests_for(w, "v2-json")[0]
    max_queue_wait_ms = load_model_config(repository / model).batching.max_queue_wait_ms
    server = start(code, repository, workers)
    cpus = parse_cpus(server_cpus) if server_cpus is not None else sorted(os.sched_getaffinity(0))
    try:
        if server_cpus is not None:
            pin([server.proc.pid, *server.worker_pids()], server_cpus)
        closed_loop(server.port, [request], concurrency=32, duration_s=2)  # warm-up
        before = cpu_sample(server, cpus)
        capacity = closed_loop(server.port, [request], concurrency=32, duration_s=capacity_s)
        capacity_cpu = cpu_use(before, cpu_sample(server, cpus), len(cpus))
        points = []
        for factor in factors:
            time.sleep(1)  # let the queue empty
            text = server_metrics.scrape(server.base_url)
            before, admitted_before = server_metrics.parse(text), admitted_durations(text, model)
            rejected_before = rejections(text, model)
            cpu_before = cpu_sample(server, cpus)
            point = paced(server.port, request, rate=factor * capacity["rps"], duration_s=duration_s,
                          connections=connections)
            cpu_used = cpu_use(cpu_before, cpu_sample(server, cpus), len(cpus))
            text = server_metrics.scrape(server.base_url)
            after, admitted_after = server_metrics.parse(text), admitted_durations(text, model)
            observed = server_metrics.delta(before, after, model)
            queue = observed.get("queue_s", {})
            # The bar: admitted p99 within the model's max_queue_wait_ms and one batch's compute.
            bound_ms = max_queue_wait_ms + observed.get("compute_s", {}).get("mean", math.nan) * 1000
            admitted = {le: c - admitted_before.get(le, 0.0) for le, c in admitted_after.items()}
            rejected = {reason: n - rejected_before.get(reason, 0.0)
                        for reason, n in rejections(text, model).items()}
            point.update(factor=factor, goodput_share=point["goodput_rps"] / capacity["rps"],
                         server_admitted_p50_ms=server_metrics.quantile(admitted, 0.5) * 1000,
                         server_admitted_p99_ms=server_metrics.quantile(admitted, 0.99) * 1000,
                         server_queue_p50_ms=queue.get("p50", math.nan) * 1000,
                         server_queue_p99_ms=queue.get("p99", math.nan) * 1000,
                         max_queue_wait_ms=max_queue_wait_ms, admitted_bound_ms=bound_ms,
                         admission_bound_ms_after=wait_bound_s(text, model) * 1000,
                         **cpu_used, server_rejections={k: n for k, n in rejected.items() if n})
            points.append(point)
            print(f"  {factor:g}x: offered {point['offered_rps']:.0f}/s, "
                  f"goodput {point['goodput_rps']:.0f}/s "
                  f"({point['goodput_share']:.0%}), refused {point['refused']}, socket errors "
                  f"{point['socket_errors']}, admitted p99 {point['admitted_p99_ms']:.1f} ms (bound "
                  f"{bound_ms:.1f} ms; histogram {point['server_admitted_p99_ms']:.1f} ms), "
                  f"queue p99 {point['server_queue_p99_ms']:.1f} ms; server CPU "
                  f"{point['server_cpu_busy']:.0%} (loop {point['server_loop_cpu_share']:.0%}), its CPUs "
                  f"idle {point['server_cpus_idle']:.0%}; rejections {point['server_rejections']}",
                  flush=True)
        return {"capacity_rps": capacity["rps"], "capacity_p99_ms": capacity["p99_ms"],
                "capacity_cpu": capacity_cpu,
                "capacity_refused": capacity["errors_status"], "points": points}
    finally:
        server.stop()


def parse_cpus(spec: str) -> list[int]:
    """A taskset CPU list ("0", "0,2", "0-3") as numbers."""
    cpus: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="fashion-mnist")
    parser.add_argument("--base", help="a git ref to compare with (e.g. the commit before a change)")
    parser.add_argument("--ref", help="a git ref to measure instead of this working tree")
    parser.add_argument("--factors", default="1,4", help="offered load as multiples of capacity")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of each open-loop point")
    parser.add_argument("--capacity-duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=2000, help="wrk's connections when paced")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--workers", type=int, default=1, help="the server's --workers (more than one: "
                        "an executor process besides them)")
    parser.add_argument("--server-cpus", help="taskset CPU list for the server (e.g. 0); wrk and this "
                        "process get the others, so the generator's work does not take the server's")
    args = parser.parse_args(argv)
    if args.server_cpus:
        server_cpus = set(parse_cpus(args.server_cpus))
        others = os.sched_getaffinity(0) - server_cpus
        if not others or not server_cpus <= os.sched_getaffinity(0):
            parser.error(f"--server-cpus {args.server_cpus}: leave at least one CPU of "
                         f"{sorted(os.sched_getaffinity(0))} to the load generator")
        os.sched_setaffinity(0, others)  # wrk, started from here, inherits it
    factors = [float(f) for f in args.factors.split(",")]
    result: dict = {"command": "python -m bench.overload " + " ".join(argv or sys.argv[1:]),
                    "model": args.model, "workers": args.workers, "server_cpus": args.server_cpus,
                    "variants": {}}
    variants: list[tuple[str, Path | None]] = [(args.ref, None) if args.ref else ("this", ROOT)]
    if args.base:
        variants.insert(0, (args.base, None))
    for name, code in variants:
        print(f"{name}:", flush=True)
        knobs = (args.repository, args.model, factors, args.duration, args.capacity_duration,
                 args.connections, args.server_cpus, args.workers)
        if code is None:
            with base_checkout(name) as base_code:
                result["variants"][name] = run_variant(base_code, *knobs)
        else:
            result["variants"][name] = run_variant(code, *knobs)
        v = result["variants"][name]
        cpu = v["capacity_cpu"]
        print(f"  capacity {v['capacity_rps']:.0f}/s ({v['capacity_refused']} refused); server CPU "
              f"{cpu['server_cpu_busy']:.0%} (loop {cpu['server_loop_cpu_share']:.0%})", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
