"""Triton's perf_analyzer against the service: V2 over gRPC and V2 over HTTP with binary tensors.

    python -m bench.perf_analyzer --fetch            # fetch the binary into the cache, print where
    python -m bench.perf_analyzer --model fashion-mnist --concurrency 1,8,64 --rounds 3
    python -m bench.perf_analyzer ... --max-queue-wait-ms 0   # no refusals for expected queue wait

The benchmark starts ONE `python -m service serve` with both an HTTP and a gRPC port on 127.0.0.1
and, per concurrency, runs perf_analyzer `--rounds` times over each protocol, interleaved (gRPC then
HTTP, then HTTP then gRPC, ...), so both see the same drift of a shared machine. It reports the
median of the rounds' throughput and p50/p99 latency (as perf_analyzer measured them at the client)
and the gRPC/HTTP ratios, as JSON with the command (`bench.executor.emit`). perf_analyzer stops at
the first failed request, a refused one included: see `repository` for `--max-queue-wait-ms`.

HTTP runs with `--input-tensor-format binary --output-tensor-format binary` (perf_analyzer's
defaults, spelled out): inputs and outputs travel as the V2 binary tensor extension, not JSON.
perf_analyzer's default is synchronous calls, one client thread per request in flight, over both
protocols; `--shared-memory none` (the default) since the service has no shared-memory extension.

Where perf_analyzer comes from: the PyPI package `perf-analyzer` is a placeholder, and the binary
that works ships inside older `tritonclient` wheels (`<name>.data/data/bin/`; 2.51.0's does). The project's
own environment pins a newer tritonclient for its Python clients, so that old wheel is never
installed: `pip download --no-deps` fetches the two wheels pinned in `WHEELS` (exact version and
sha256), and the binary and the CUDA runtime library it links (it runs on CPU-only machines; it
only needs `libcudart.so.12` to load) are extracted into a cache folder. It also links libb64
(Debian: `libb64-0d`, in the Makefile's system packages). Linux x86-64 only.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    sha256: str
    member: str  # the file taken out of it
    target: str  # where it goes in the cache folder


# The pinned wheels (any change here: new filename, sha256 and member, then `--fetch`).
# tritonclient 2.51.0 is the last release whose wheel carries perf_analyzer (2.51.0 = Triton 24.10).
# nvidia-cuda-runtime-cu12 provides libcudart.so.12, which perf_analyzer loads even without a GPU.
WHEELS = (
    Wheel("tritonclient==2.51.0", "tritonclient-2.51.0-py3-none-manylinux1_x86_64.whl",
          "c485bb0123bdf310f90bc8b03d3489b28df2ffed55b30c7eee0b795b48113d52",
          "tritonclient-2.51.0.data/data/bin/perf_analyzer", "bin/perf_analyzer"),
    Wheel("nvidia-cuda-runtime-cu12==12.4.127",
          "nvidia_cuda_runtime_cu12-12.4.127-py3-none-manylinux2014_x86_64.whl",
          "64403288fa2136ee8e467cdc9c9427e0434110899d07c779f25b5c068934faa5",
          "nvidia/cuda_runtime/lib/libcudart.so.12", "lib/libcudart.so.12"),
)
# Bump when WHEELS change, so an old cache is not taken for the new one.
CACHE_VERSION = "tritonclient-2.51.0+cudart-12.4.127"


def cache_dir() -> Path:
    """Under `$NEUROSERVE_DATA_DIR` (default `~/.cache/neuroserve`), like the training data."""
    root = Path(os.environ.get("NEUROSERVE_DATA_DIR", Path.home() / ".cache" / "neuroserve"))
    return root / "perf_analyzer" / CACHE_VERSION


@dataclass(frozen=True)
class PerfAnalyzer:
    """A runnable perf_analyzer: run `[binary, ...]` with `env` (this environment plus its libraries)."""

    binary: Path
    env: dict[str, str]

    def run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)


class Unavailable(RuntimeError):
    """perf_analyzer cannot be obtained or run here (the message says why)."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _supported() -> str | None:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"perf_analyzer's wheel is for Linux x86-64 only, not {sys.platform} {platform.machine()}"
    return None


def _installed(folder: Path) -> PerfAnalyzer | None:
    binary, lib = folder / "bin" / "perf_analyzer", folder / "lib"
    if not (binary.is_file() and os.access(binary, os.X_OK) and (lib / "libcudart.so.12").is_file()):
        return None
    path = os.pathsep.join(p for p in (str(lib), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    return PerfAnalyzer(binary, {**os.environ, "LD_LIBRARY_PATH": path})


def _download(wheel: Wheel, into: Path) -> Path:
    """`pip download` of one pinned wheel (no dependencies, binary only), its sha256 checked."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(into), wheel.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    path = into / wheel.filename
    if done.returncode != 0 or not path.is_file():
        raise Unavailable(f"pip download {wheel.requirement} failed ({done.returncode}): "
                          f"{(done.stderr or done.stdout).strip()[-500:]}")
    if (digest := _sha256(path)) != wheel.sha256:
        raise Unavailable(f"{wheel.filename}: sha256 {digest}, expected {wheel.sha256}")
    return path


def fetch() -> PerfAnalyzer:
    """perf_analyzer from the cache, downloading and extracting the pinned wheels the first time;
    raises `Unavailable` with the reason where that is not possible."""
    if reason := _supported():
        raise Unavailable(reason)
    folder = cache_dir()
    if (found := _installed(folder)) is None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Extract into a fresh folder and rename it into place, so a half-done fetch (or two at
        # once) never leaves a cache that looks complete.
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
            staging = Path(tmp) / "tree"
            for wheel in WHEELS:
                with zipfile.ZipFile(_download(wheel, Path(tmp))) as z, z.open(wheel.member) as src:
                    target = staging / wheel.target
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    target.chmod(0o755)
            with contextlib.suppress(OSError):  # another process got there first: keep its copy
                staging.rename(folder)
        if (found := _installed(folder)) is None:
            raise Unavailable(f"{folder} is incomplete after the fetch")
    check = subprocess.run([str(found.binary), "--version"], env=found.env, capture_output=True,
                           text=True, timeout=30)
    if check.returncode != 0:
        out = (check.stderr or check.stdout).strip()
        hint = " (install the Debian package libb64-0d: make system-deps)" if "libb64" in out else ""
        raise Unavailable(f"{found.binary} --version exited {check.returncode}: {out[-300:]}{hint}")
    return found


def locate() -> tuple[PerfAnalyzer | None, str]:
    """(perf_analyzer, "") or (None, why it cannot be had here)."""
    try:
        return fetch(), ""
    except (Unavailable, OSError, subprocess.SubprocessError) as e:
        return None, str(e)


# -- one measurement -------------------------------------------------------------------------------


def measure_args(model: str, protocol: str, url: str, concurrency: int, *, interval_ms: int,
                 csv_path: Path, max_trials: int = 10, stability: int = 10) -> list[str]:
    """perf_analyzer's arguments for one concurrency over one protocol ("grpc" or "http")."""
    args = ["-m", model, "-i", protocol, "-u", url, "--concurrency-range", f"{concurrency}:{concurrency}",
            "--measurement-interval", str(interval_ms), "--max-trials", str(max_trials),
            "--stability-percentage", str(stability), "--shared-memory", "none", "-f", str(csv_path)]
    if protocol == "http":
        args += ["--input-tensor-format", "binary", "--output-tensor-format", "binary"]
    return args


def read_csv(path: Path) -> dict[str, float]:
    """The first row of perf_analyzer's `-f` report: throughput (infer/s) and latencies (µs)."""
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    if not rows:
        raise ValueError(f"{path}: no measurement")
    row = rows[0]
    return {"concurrency": int(row["Concurrency"]), "throughput": float(row["Inferences/Second"]),
            "p50_us": float(row["p50 latency"]), "p90_us": float(row["p90 latency"]),
            "p95_us": float(row["p95 latency"]), "p99_us": float(row["p99 latency"])}


def repository(models: Path, model: str, into: Path, max_queue_wait_ms: float | None = None) -> Path:
    """A model repository in `into` holding `models/<model>` alone (its files linked, not copied),
    with `[batching] max_queue_wait_ms` replaced where given (0: no refusal for expected wait).

    perf_analyzer stops at the first failed request, and a request the service refuses because
    the queue's expected wait is over the bound (429 / RESOURCE_EXHAUSTED) is one: on a machine
    shared with other work the shipped fashion-mnist's 100 ms bound was met at concurrency 8."""
    import tomllib

    import tomli_w

    source, target = (models / model).resolve(), into / model
    target.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "config.toml":
            (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    config = tomllib.loads((source / "config.toml").read_text())
    if max_queue_wait_ms is not None:
        config.setdefault("batching", {})["max_queue_wait_ms"] = float(max_queue_wait_ms)
    (target / "config.toml").write_text(tomli_w.dumps(config))
    return into


# -- the benchmark ---------------------------------------------------------------------------------


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perf_analyzer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fetch", action="store_true", help="only fetch perf_analyzer and print where it is")
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="fashion-mnist")
    p.add_argument("--concurrency", type=_ints, default=[1, 8, 64], help="e.g. 1,8,64")
    p.add_argument("--rounds", type=int, default=3, help="runs per protocol and concurrency, interleaved")
    p.add_argument("--interval-ms", type=int, default=2000, help="perf_analyzer's measurement window")
    p.add_argument("--stability", type=int, default=100,
                   help="perf_analyzer's --stability-percentage: when it stops measuring (its default, "
                        "10 %%, rarely holds on a shared 2-core machine; the rounds' medians take the noise)")
    p.add_argument("--max-queue-wait-ms", type=float,
                   help="replace the model's [batching] max_queue_wait_ms (0: off); default: its own")
    p.add_argument("--max-trials", type=int, default=10, help="perf_analyzer's --max-trials")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--server-args", default="", help="extra `neuroserve serve` flags")
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    args = p.parse_args(argv)

    if args.fetch:
        if _supported():  # nothing to fetch on this platform (the tests skip); not an error
            print(_supported())
            return 0
        pa = fetch()
        print(pa.binary)
        return 0

    from bench.servers import free_port, start_service, wait_idle

    pa = fetch()
    shown = pa.run(["--version"], timeout=30)
    version = (shown.stdout + shown.stderr).strip()
    grpc_port = free_port()
    load_before = _loadavg()
    runs: list[dict] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="perf_analyzer-")))
        models = repository(args.repository, args.model, tmp / "models", args.max_queue_wait_ms)
        server = stack.enter_context(start_service(
            models, workers=args.workers, log_dir=tmp,
            extra_args=["--grpc-port", str(grpc_port), *args.server_args.split()]))
        urls = {"grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{server.port}"}
        for c in args.concurrency:
            for r in range(args.rounds):
                # Alternate which protocol goes first, so neither always follows the other.
                for protocol in ("grpc", "http") if r % 2 == 0 else ("http", "grpc"):
                    wait_idle([server])
                    report = tmp / f"{protocol}-{c}-{r}.csv"
                    cmd = measure_args(args.model, protocol, urls[protocol], c, interval_ms=args.interval_ms,
                                       csv_path=report, max_trials=args.max_trials, stability=args.stability)
                    start = time.monotonic()
                    done = pa.run(cmd, timeout=60 + args.max_trials * args.interval_ms / 1000 * 3)
                    run = {"protocol": protocol, "concurrency": c, "round": r, "rc": done.returncode,
                           "seconds": round(time.monotonic() - start, 1)}
                    if done.returncode == 0 and report.is_file():
                        run.update(read_csv(report))
                    else:
                        run["error"] = (done.stderr or done.stdout).strip()[-500:]
                    print(f"# {run}", file=sys.stderr)
                    runs.append(run)
    load_after = _loadavg()

    summary = []
    for c in args.concurrency:
        point: dict = {"concurrency": c}
        for protocol in ("grpc", "http"):
            ok = [r for r in runs if r["concurrency"] == c and r["protocol"] == protocol and r["rc"] == 0]
            point[protocol] = {"runs": len(ok), **{
                k: statistics.median(r[k] for r in ok) for k in ("throughput", "p50_us", "p99_us") if ok}}
        if point["grpc"].get("throughput") and point["http"].get("throughput"):
            point["grpc_over_http"] = {
                "throughput": round(point["grpc"]["throughput"] / point["http"]["throughput"], 3),
                "p50": round(point["grpc"]["p50_us"] / point["http"]["p50_us"], 3),
                "p99": round(point["grpc"]["p99_us"] / point["http"]["p99_us"], 3)}
        summary.append(point)

    from bench.executor import emit

    result = {"benchmark": "perf_analyzer V2 gRPC vs V2 HTTP binary", "model": args.model,
              "perf_analyzer": version, "cpus": os.cpu_count(), "workers": args.workers,
              "interval_ms": args.interval_ms, "rounds": args.rounds, "stability": args.stability,
              "max_queue_wait_ms": args.max_queue_wait_ms,
              "loadavg_before": load_before, "loadavg_after": load_after,
              "summary": summary, "runs": runs}
    emit(result, "bench.perf_analyzer", argv, args.out)
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
