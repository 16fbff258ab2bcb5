"""A real server in a subprocess: `python -m service serve` on a free port of 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_server(repo: Path, log: Path, *args: str, wait: str = "ready", timeout: float = 120,
                 env: dict[str, str] | None = None) -> Server:
    """Start `python -m service serve` on a free port and wait until it is ready (or done loading,
    or not at all: wait="started");
    `env` adds variables to this process's environment (NEUROSERVE_* and OTEL_* left out)."""
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("NEUROSERVE_", "OTEL_"))}
    inherited.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env = {**inherited, **(env or {})}
    cmd = [
        sys.executable,
        "-m",
        "service",
        "serve",
        "--model-repository",
        str(repo),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--intra-op-threads",
        "1",
        # No gRPC unless a test asks for it (a later --grpc-port wins): the default port is shared.
        "--grpc-port",
        "0",
        # Stop at once on SIGTERM unless a test asks for a grace period (a later flag wins).
        "--drain-grace-s",
        "0",
        *args,
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    if wait == "started":  # the caller waits itself (e.g. over TLS)
        return server
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.logs()}")
            try:
                if wait == "ready" and client.get("/v2/health/ready").status_code == 200:
                    return server
                if wait == "loaded":
                    index = client.post("/v2/repository/index").json()
                    if index and all(e["state"] != "LOADING" for e in index):
                        return server
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready within {timeout}s:\n{server.logs()}")
