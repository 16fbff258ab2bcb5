"""Several worker processes, each listening on the same port through its own SO_REUSEPORT socket.

uvicorn's `--workers` shares one listening socket: whichever worker's event loop wakes first accepts,
so a burst of new connections can all land on one worker. The service's loop is rarely busy (compute
runs on other threads), and in the benchmark a client's 64 keep-alive connections sometimes all went
to one of two workers: 2,720 req/s instead of about 5,000, the other worker idle. With a socket per
worker the kernel spreads connections over the workers by a hash of their addresses.

The parent only supervises: it starts the workers, starts a new one when one dies, and on SIGTERM or
SIGINT sends each worker SIGTERM (which drains it, see `service.server.app`) and waits for them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger("neuroserve.workers")


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT; `listen` is left to the server, which
    calls it once the worker's start-up (model loading) is over, so no connection waits on a cold worker."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(address)
    return sock


def _worker(config: dict[str, Any], host: str, port: int) -> None:
    try:
        sock = listening_socket(host, port)
    except OSError as e:
        logging.getLogger("uvicorn.error").error("cannot bind %s:%s: %s", host, port, e)
        sys.exit(STARTUP_FAILURE)
    uvicorn.Server(uvicorn.Config(**config)).run(sockets=[sock])


def serve(config: dict[str, Any], *, workers: int, host: str, port: int, stop_timeout_s: float) -> int:
    """Run `workers` uvicorn servers of `config` (keyword arguments of `uvicorn.Config`) until SIGTERM
    or SIGINT; 0, or 1 when a worker could not start."""
    # Port 0: pick one here and keep it bound (not listening) so every worker gets the same.
    reserved = listening_socket(host, port) if port == 0 else None
    if reserved is not None:
        port = reserved.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    stop = threading.Event()

    def start() -> BaseProcess:
        process = context.Process(target=_worker, args=(config, host, port), name="neuroserve-worker")
        process.start()
        return process

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    processes = [start() for _ in range(workers)]
    log.info("workers started", extra={"pids": [p.pid for p in processes], "port": port})
    code = 0
    while not stop.wait(0.5):
        for i, process in enumerate(processes):
            if process.is_alive():
                continue
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker %s could not start; stopping", process.pid)
                code = 1
                stop.set()
                break
            log.warning("worker %s exited with %s; starting another", process.pid, process.exitcode)
            processes[i] = start()
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]
    deadline = time.monotonic() + stop_timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("worker %s did not stop in %.0f s; killing it", process.pid, stop_timeout_s)
            process.kill()
            process.join()
    if reserved is not None:
        reserved.close()
    return code
