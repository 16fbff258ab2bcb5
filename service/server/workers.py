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
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from service.core.wire import Address
from service.observability import metrics
from service.process import supervised

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
    supervised()
    try:
        sock = listening_socket(host, port)
    except OSError as e:
        logging.getLogger("uvicorn.error").error("cannot bind %s:%s: %s", host, port, e)
        sys.exit(STARTUP_FAILURE)
    uvicorn.Server(uvicorn.Config(**config)).run(sockets=[sock])


# An executor that dies sooner than this after its start is restarted only after this long.
EXECUTOR_MIN_LIFE_S = 2.0


def serve(config: dict[str, Any], *, workers: int, host: str, port: int, stop_timeout_s: float,
          executors: Sequence[tuple[Address, int | None]] = ()) -> int:
    """Run `workers` uvicorn servers of `config` (keyword arguments of `uvicorn.Config`), and an
    executor process for each of `executors` (its sockets, and its GPU or None), until SIGTERM or
    SIGINT; 0, or 1 when a worker could not start.

    A process that dies is replaced at once and its metric files are retired (its gauges must
    not count any more). On stop the front-ends drain first (they still need the executor for the
    requests they finish), then the executor."""
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

    def start_executor(i: int) -> BaseProcess:
        from service.core.executor import serve as executor_main  # ONNX Runtime: not in front-ends

        process = context.Process(target=executor_main, args=executors[i], name="neuroserve-executor")
        process.start()
        log.info("executor started", extra={"pid": process.pid, "gpu": executors[i][1]})
        return process

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    model_executors = [start_executor(i) for i in range(len(executors))]
    executors_started = [time.monotonic()] * len(executors)
    processes = [start() for _ in range(workers)]
    # SIGHUP (re-read the API keys file) is each worker's to handle.
    signal.signal(signal.SIGHUP, lambda signum, frame: [
        os.kill(p.pid, signal.SIGHUP) for p in processes if p.is_alive() and p.pid])  # type: ignore[func-returns-value]
    log.info("workers started", extra={"pids": [p.pid for p in processes], "port": port})
    code = 0
    while not stop.is_set():
        watched = [p.sentinel for p in [*processes, *model_executors]]
        multiprocessing.connection.wait(watched, timeout=0.2)
        if stop.is_set():
            break
        for i, dead in enumerate(model_executors):
            if dead.is_alive():
                continue
            log.error("executor %s exited with %s; starting another", dead.pid, dead.exitcode)
            metrics.process_exited(dead.pid)
            if time.monotonic() - executors_started[i] < EXECUTOR_MIN_LIFE_S:
                stop.wait(EXECUTOR_MIN_LIFE_S)  # one that dies at once would otherwise spin
            model_executors[i] = start_executor(i)
            executors_started[i] = time.monotonic()
        for i, process in enumerate(processes):
            if process.is_alive():
                continue
            metrics.process_exited(process.pid)
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker %s could not start; stopping", process.pid)
                code = 1
                stop.set()
                break
            log.warning("worker %s exited with %s; starting another", process.pid, process.exitcode)
            processes[i] = start()
    _stop(processes, stop_timeout_s)
    _stop(model_executors, stop_timeout_s)
    if reserved is not None:
        reserved.close()
    return code


def _stop(processes: list[BaseProcess], timeout_s: float) -> None:
    """SIGTERM each, wait up to `timeout_s` in all, kill what is left."""
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("%s %s did not stop in %.0f s; killing it", process.name, process.pid, timeout_s)
            process.kill()
            process.join()
        metrics.process_exited(process.pid)
