"""`python -m bench`: the performance benchmark of neuroserve.

    python -m bench all --quick        # a short run (minutes) of everything, report in docs/
    python -m bench all                # the full run (about an hour on 2 cores)
    python -m bench raw                # ONNX Runtime in process, per model and batch size
    python -m bench int8               # the served int8 graphs against their FP32 graphs
    python -m bench soak --duration 300
    python -m bench tune --model fashion-mnist   # batching knobs for this machine
    python -m bench breakdown --model models/fashion-mnist   # µs per step of the request path
    python -m bench report             # re-render docs/benchmarks.md from the saved results
    python -m bench reference --model models/fashion-mnist --port 8100 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from bench import breakdown, int8, raw_ort, report, soak, suite, tune
from bench.workloads import find_models, model_file, raw_workload
from training.report import measured_with


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository")
    p.add_argument("--models", help="comma-separated model names (default: all in the repository)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, on both servers")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="raw results folder")
    p.add_argument("--providers", choices=("cpu", "cuda"), default="cpu",
                   help="ONNX Runtime execution provider of every server and of the raw ceiling")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("all", help="raw ORT + load on reference and service + soak + report")
    _common(a)
    a.add_argument("--quick", action="store_true", help="short points, fewer concurrencies, 30 s soak")
    a.add_argument("--ort-threads", type=int, help="ORT threads per worker (default cores/workers)")
    a.add_argument("--concurrency", type=_ints, help="closed-loop concurrencies, e.g. 1,8,32,64,128")
    a.add_argument("--rates", type=_floats, help="open-loop rates as fractions of the peak, e.g. 0.3,0.6,0.9")
    a.add_argument("--duration", type=float, help="seconds per load point")
    a.add_argument("--reps", type=int, help="repetitions (≥ 3 for the report)")
    a.add_argument("--protocols", default="v2-json,v2-binary,task")
    a.add_argument("--no-service", action="store_true", help="measure the reference server only")
    a.add_argument("--no-reference", action="store_true",
                   help="measure the service only (a sweep of workers or knobs)")
    a.add_argument("--soak", type=float, help="soak seconds (0: none; default 300, quick 30)")
    a.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    a.add_argument("--no-report", action="store_true")
    a.add_argument("--conditions", default="", help="free text on the machine's state, for the report")

    r = sub.add_parser("raw", help="ONNX Runtime in process, samples/s and latency per batch size")
    _common(r)
    r.add_argument("--threads", type=int, default=os.cpu_count())
    r.add_argument("--batch-sizes", type=_ints, default=raw_ort.DEFAULT_BATCH_SIZES)
    r.add_argument("--duration", type=float, default=2.0)

    q = sub.add_parser("int8", help="served int8 graphs vs their FP32 graphs, raw ORT, batch 1 and 16")
    q.add_argument("--repository", type=Path, default=Path("models"), help="model repository")
    q.add_argument("--models", default="fashion-mnist,mnist,sentiment")
    q.add_argument("--threads", type=_ints, default=(1, 2), help="ORT threads, e.g. 1,2")
    q.add_argument("--rounds", type=int, default=7, help="rounds of interleaved measurement")
    q.add_argument("--out", type=Path, default=Path("docs/benchmarks/int8.json"))

    s = sub.add_parser("soak", help="RSS per worker over a bounded run at ~70 %% of peak")
    _common(s)
    s.add_argument("--model", default="fashion-mnist")
    s.add_argument("--protocol", default="v2-json")
    s.add_argument("--duration", type=float, default=300.0)
    s.add_argument("--fraction", type=float, default=0.7)
    s.add_argument("--peak", type=float, help="peak req/s (default: measured first)")
    s.add_argument("--reference", action="store_true", help="soak the reference server instead")

    rep = sub.add_parser("report", help="render docs/benchmarks.md and the PNG from saved results")
    rep.add_argument("--results", type=Path, default=Path("docs/benchmarks/results.json"))
    rep.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))

    t = sub.add_parser("tune", help="measure max_batch_size × max_queue_delay_ms "
                                    "[× max_padding_ratio] candidates")
    _common(t)
    t.add_argument("--model", required=True)
    t.add_argument("--max-batch-sizes", type=_ints, default=(8, 32, 64))
    t.add_argument("--delays-ms", type=_floats, default=(0.0, 1.0, 2.0, 5.0))
    t.add_argument("--max-padding-ratios", type=_floats, default=(),
                   help="also vary max_padding_ratio (models with variable-length inputs)")
    t.add_argument("--worker-counts", type=_ints,
                   help="also vary the worker processes, e.g. 1,2,4 (default: --workers)")
    t.add_argument("--protocol", default="v2-binary")
    t.add_argument("--concurrency", type=int, default=64)
    t.add_argument("--duration", type=float, default=5.0)
    t.add_argument("--reps", type=int, default=3)

    b = sub.add_parser("breakdown", help="µs per step of a V2 request path, in process")
    b.add_argument("--model", type=Path, required=True, help="a model directory of the repository")
    b.add_argument("--threads", type=int, default=1)

    ref = sub.add_parser("reference", help="serve the reference server (foreground)")
    ref.add_argument("--model", type=Path, required=True, help="a model directory of the repository")
    ref.add_argument("--port", type=int, default=8100)
    ref.add_argument("--workers", type=int, default=1)
    ref.add_argument("--ort-threads", type=int)

    args = parser.parse_args(argv)
    command = "python -m bench " + shlex.join(argv)

    if args.cmd == "all":
        if args.no_service and args.no_reference:
            parser.error("--no-service and --no-reference leave nothing to measure")
        plan = suite.Plan(repository=args.repository, workers=args.workers, ort_threads=args.ort_threads,
                          out=args.out, command=command, service=not args.no_service,
                          reference=not args.no_reference, provider=args.providers,
                          protocols=tuple(args.protocols.split(",")))
        if args.models:
            plan.models = args.models.split(",")
        if args.quick:
            plan.concurrencies, plan.open_rate_fractions = suite.QUICK_CONCURRENCIES, (0.5,)
            plan.duration_s, plan.warmup_s, plan.raw_duration_s = 5.0, 1.0, 1.0
            plan.raw_batch_sizes = (1, 8, 32, 128)
        plan.concurrencies = args.concurrency or plan.concurrencies
        plan.open_rate_fractions = args.rates if args.rates is not None else plan.open_rate_fractions
        plan.duration_s = args.duration or plan.duration_s
        plan.reps = args.reps or plan.reps
        results = suite.run(plan)
        if args.conditions:
            results["meta"]["conditions"] = args.conditions
        soak_s = args.soak if args.soak is not None else (30.0 if args.quick else 300.0)
        if soak_s > 0:
            names = [d.name for d in find_models(args.repository)]
            model = "fashion-mnist" if "fashion-mnist" in names else names[0]
            results["soak"] = soak.run(args.repository, model=model, duration_s=soak_s,
                                       workers=args.workers, use_service=plan.service, out=args.out,
                                       max_rate=plan.max_open_rate, provider=args.providers)
        results_path = args.out / plan.results_name
        results_path.write_text(json.dumps(results, indent=1, default=float))
        if not args.no_report:
            print(f"report: {report.write(results_path, args.doc)}")
        return 0

    if args.cmd == "raw":
        for d in find_models(args.repository):
            if args.models and d.name not in args.models.split(","):
                continue
            res = raw_ort.run(raw_workload(d), model_file(d), threads=args.threads,
                              batch_sizes=args.batch_sizes, duration_s=args.duration, provider=args.providers)
            for p in res["points"]:
                print(f"{d.name:14s} batch {p['batch_size']:4d}: {p['samples_per_s']:10,.0f} samples/s  "
                      f"p50 {p['p50_ms']:7.3f} ms  p99 {p['p99_ms']:7.3f} ms")
        return 0

    if args.cmd == "int8":
        results = {"command": command, "machine": measured_with(), "runs": []}
        for name in args.models.split(","):
            for threads in args.threads:
                res = int8.run(args.repository / name, threads=threads, rounds=args.rounds)
                results["runs"].append(res)
                for p in res["points"]:
                    print(f"{name:14s} {threads} thread(s) batch {p['batch_size']:3d}: "
                          f"int8 {p['int8_ms']:8.3f} ms  FP32 {p['fp32_ms']:8.3f} ms  ×{p['speedup']:.2f}")
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{results['machine']}; written to {args.out}")
        return 0

    if args.cmd == "soak":
        res = soak.run(args.repository, model=args.model, protocol=args.protocol, duration_s=args.duration,
                       fraction=args.fraction, peak_rps=args.peak, workers=args.workers,
                       use_service=not args.reference, out=args.out, provider=args.providers)
        print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1))
        results_path = args.out / "results.json"
        if results_path.exists() and not args.reference:  # `bench report` then shows this soak
            results = json.loads(results_path.read_text())
            results["soak"] = res
            results_path.write_text(json.dumps(results, indent=1, default=float))
        return 0

    if args.cmd == "tune":
        rows = tune.run(args.repository, args.model, max_batch_sizes=args.max_batch_sizes,
                        delays_ms=args.delays_ms, padding_ratios=args.max_padding_ratios,
                        protocol=args.protocol, concurrency=args.concurrency,
                        duration_s=args.duration, reps=args.reps,
                        worker_counts=args.worker_counts or (args.workers,), provider=args.providers)
        print(f"{args.model}, {args.protocol}, medians of {args.reps} interleaved repetitions:")
        padding = bool(args.max_padding_ratios)
        print(f"| workers | max_batch_size | max_queue_delay_ms |{' max_padding_ratio |' * padding} "
              f"req/s at c={args.concurrency} | p99 ms | p50 ms at c=1 |")
        print("|---:|---:|---:|" + "---:|" * padding + "---:|---:|---:|")
        for r in rows:
            ratio = f" {r['max_padding_ratio']:g} |" if padding else ""
            print(f"| {r['workers']} | {r['max_batch_size']} | {r['max_queue_delay_ms']:g} |{ratio} "
                  f"{r['rps']:,.0f} | {r['p99_ms']:.2f} | {r['p50_c1_ms']:.2f} |")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"tune-{args.model}.json").write_text(json.dumps(rows, indent=1))
        return 0

    if args.cmd == "breakdown":
        print(f"| step ({args.model.name}) | µs per call (best of 5) |\n|---|---:|")
        for name, us in breakdown.run(args.model, threads=args.threads):
            print(f"| {name} | {'' if us != us else f'{us:,.1f}'} |")
        return 0

    if args.cmd == "report":
        print(report.write(args.results, args.doc))
        return 0

    if args.cmd == "reference":
        threads = args.ort_threads or max(1, (os.cpu_count() or 1) // args.workers)
        env = {**os.environ, "BENCH_REF_MODEL": str(model_file(args.model)),
               "BENCH_REF_NAME": args.model.name, "BENCH_REF_ORT_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "uvicorn", "bench.reference_server:create_app", "--factory",
               "--host", "127.0.0.1", "--port", str(args.port), "--workers", str(args.workers),
               "--log-level", "warning", "--no-access-log"]
        return subprocess.call(cmd, env=env)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
