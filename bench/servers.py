"""Start the servers under test as subprocesses on 127.0.0.1, wait for readiness, stop them by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
# The module a traced service runs its span exporter processes as (not a worker, but its CPU counts).
SPAN_EXPORTER = "service.observability.otlp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server process this benchmark started (its own process group, so workers go with it)."""

    name: str
    proc: subprocess.Popen
    port: int
    log: Path | None = None
    info: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: uvicorn's workers, or the main process without any."""
        kids = [p for p in _children(self.proc.pid)
                if "resource_tracker" not in (cmd := _cmdline(p)) and SPAN_EXPORTER not in cmd]
        return kids or [self.proc.pid]

    def span_exporter_pids(self) -> list[int]:
        """The span exporter processes of a traced service (one per worker)."""
        parents = {self.proc.pid, *self.worker_pids()}
        return [c for p in parents for c in _children(p) if SPAN_EXPORTER in _cmdline(c)]

    def rss_mib(self) -> dict[int, float]:
        return {pid: rss for pid in self.worker_pids() if (rss := rss_mib(pid)) is not None}

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the main process, its workers and their span exporters."""
        pids = {self.proc.pid, *self.worker_pids(), *self.span_exporter_pids()}
        return sum(cpu_seconds(pid) for pid in pids)

    def loop_cpu_seconds(self) -> float:
        """The part of `cpu_seconds` spent on the workers' main threads, where the event loop runs
        (HTTP, codecs, routing); the rest is the batchers' compute threads and the decoding pool."""
        return sum(cpu_seconds(pid, thread=pid) for pid in self.worker_pids())

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this module created for it
            self.proc.wait(5)
        # Workers left behind by a master that died first are in the same group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_idle(running: Iterable[Server], *, window_s: float = 0.2, max_cores: float = 0.15,
              timeout_s: float = 15.0) -> float:
    """Wait until the servers have stopped computing; return the seconds waited.

    A closed-loop client that stops leaves the requests it had in flight with the server, which
    computes them all (nothing accepted is dropped): after a point at concurrency 128 on 2 cores
    the reference server kept both cores busy for 0.8 s, the service for 0.4 s. Whatever is
    measured next (the raw ceiling, another configuration) would share the cores with that.
    `max_cores` allows for timers and the 10 ms granularity of the kernel's CPU accounting.
    """
    running = list(running)
    start = time.monotonic()
    before = sum(s.cpu_seconds() for s in running)
    while True:
        time.sleep(window_s)
        now = sum(s.cpu_seconds() for s in running)
        waited = time.monotonic() - start
        if (now - before) / window_s <= max_cores or waited >= timeout_s:
            return waited
        before = now


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU of a process (all its threads), or of one of its threads."""
    stat = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _start(name: str, cmd: list[str], port: int, env: dict[str, str], log_dir: Path | None,
           ready_path: str, timeout: float) -> Server:
    log = None
    out = subprocess.DEVNULL
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{name}-{port}.log"
        out = open(log, "wb")  # noqa: SIM115 - the child owns it for its life
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = Server(name, proc, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready\n{tail}")
        try:
            with urllib.request.urlopen(server.base_url + ready_path, timeout=2) as r:
                if r.status == 200:
                    # With several workers, give every worker the time to come up too.
                    time.sleep(0.5)
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"{name} was not ready within {timeout:.0f} s")


def start_reference(model_onnx: Path, model_name: str, *, workers: int = 1, ort_threads: int = 1,
                    provider: str = "cpu", port: int | None = None, log_dir: Path | None = None,
                    timeout: float = 120) -> Server:
    port = port or free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bench.reference_server:create_app", "--factory",
           "--host", HOST, "--port", str(port), "--workers", str(workers),
           "--log-level", "warning", "--no-access-log"]
    env = {"BENCH_REF_MODEL": str(model_onnx), "BENCH_REF_NAME": model_name,
           "BENCH_REF_ORT_THREADS": str(ort_threads), "BENCH_REF_PROVIDER": provider}
    server = _start("reference", cmd, port, env, log_dir, "/v2/health/ready", timeout)
    server.info = {"workers": workers, "ort_threads": ort_threads, "model": model_name, "provider": provider}
    return server


def start_service(repository: Path, *, workers: int = 1, port: int | None = None,
                  log_dir: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None,
                  extra_args: list[str] | None = None) -> Server:
    port = port or free_port()
    extra_args = list(extra_args or [])
    if "--grpc-port" not in extra_args:
        # The HTTP benchmarks need no gRPC, and servers up side by side must not share its port.
        extra_args += ["--grpc-port", "0"]
    cmd = [sys.executable, "-m", "service", "serve", "--model-repository", str(repository),
           "--host", HOST, "--port", str(port), "--workers", str(workers), *extra_args]
    server = _start("service", cmd, port, env or {}, log_dir, "/v2/health/ready", timeout)
    server.info = {"workers": workers}
    # Ready means one worker answers. Each worker listens on its own socket once it has loaded, and
    # connections opened before the last one listens would all go to the others.
    deadline = time.monotonic() + timeout
    while listening_sockets(port) < workers:
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"only {listening_sockets(port)} of {workers} workers listen")
        time.sleep(0.2)
    return server


def listening_sockets(port: int) -> int:
    """TCP sockets listening on local `port` (one per worker for the service)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    count += 1
    return count


def service_available() -> bool:
    """Whether the service can be started here (`python -m service serve` and its CLI exist)."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None
                   for m in ("service.__main__", "service.cli", "service.server.app"))
    except ImportError:
        return False
