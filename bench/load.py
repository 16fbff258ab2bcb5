"""Load generation against 127.0.0.1: closed loop with `wrk`, open loop with a Poisson asyncio client.

Closed loop: `wrk` (C, one thread) keeps `concurrency` connections busy; a Python client on a
2-core machine would saturate before the server does. Latency percentiles come from wrk's own
histogram via the `done()` callback of `post.lua`.

Both report the load generator's own CPU time (`client_cpu_s`): it shares the machine's cores with
the server, so the benchmark can tell a saturated machine from a server that leaves cores idle.

Open loop: arrival times are drawn up front (exponential gaps at a fixed rate) and each request's
latency is measured from its *scheduled* send time, so a slow server cannot slow the arrivals down
and hide its queueing (no coordinated omission). Debian has no `wrk2`, hence this client. Its own
lag (actual send minus scheduled send) is reported so that a saturated client shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.servers import HOST
from bench.workloads import Request

POST_LUA = Path(__file__).with_name("post.lua")


class LoadError(RuntimeError):
    pass


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def write_manifest(folder: Path, requests: list[Request]) -> Path:
    """The requests as the wrk scripts read them: one line per request (path, body file, headers),
    tab-separated, beside the body files."""
    lines = []
    for i, r in enumerate(requests):
        body = folder / f"body{i}"
        body.write_bytes(r.body)
        fields = [r.path, str(body)]
        for k, v in r.headers.items():
            fields += [k, v]
        lines.append("\t".join(fields))
    manifest = folder / "manifest.tsv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def wrk_result(proc: subprocess.CompletedProcess[str]) -> dict:
    """The counters a wrk script printed on its `WRKJSON ` line."""
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise LoadError(f"wrk gave no result (rc {proc.returncode}): "
                        f"{proc.stdout[-500:]} {proc.stderr[-500:]}")
    return json.loads(line[len("WRKJSON "):])


def closed_loop(port: int, requests: list[Request], *, concurrency: int, duration_s: float,
                timeout_s: float = 10.0) -> dict:
    """Run wrk for `duration_s` at `concurrency` connections; requests/s, percentiles (ms), errors."""
    if not wrk_available():
        raise LoadError("wrk is not installed (Debian package `wrk`)")
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        manifest = write_manifest(Path(tmp), requests)
        cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s",
               f"--timeout={max(1, round(timeout_s))}s", "-s", str(POST_LUA),
               f"http://{HOST}:{port}/", "--", str(manifest)]
        before = _children_cpu_seconds()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
        client_cpu_s = _children_cpu_seconds() - before
    raw = wrk_result(proc)
    duration = raw["duration_us"] / 1e6
    socket_errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    ok = raw["requests"] - raw["status"]
    return {
        "mode": "closed", "concurrency": concurrency, "duration_s": duration,
        "requests": raw["requests"], "ok": ok, "errors": raw["status"] + socket_errors,
        "errors_status": raw["status"], "errors_socket": socket_errors,
        "rps": ok / duration if duration > 0 else 0.0,
        "p50_ms": raw["p50_us"] / 1e3, "p90_ms": raw["p90_us"] / 1e3, "p99_ms": raw["p99_us"] / 1e3,
        "p999_ms": raw["p999_us"] / 1e3, "mean_ms": raw["mean_us"] / 1e3, "max_ms": raw["max_us"] / 1e3,
        "client_cpu_s": client_cpu_s,
    }


def _children_cpu_seconds() -> float:
    """User + system CPU of this process's finished (waited-for) children: wrk, once it exits."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- open loop ---------------------------------------------------------------------------------

def _raw_request(r: Request) -> bytes:
    head = [f"POST {r.path} HTTP/1.1", f"Host: {HOST}", f"Content-Length: {len(r.body)}"]
    head += [f"{k}: {v}" for k, v in r.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + r.body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    if headers.get("connection", "").lower() == "close":
        raise ConnectionResetError("server closed the connection")
    return status


async def _open_loop(port: int, payloads: list[bytes], offsets: np.ndarray, max_connections: int,
                     timeout_s: float) -> dict:
    loop = asyncio.get_running_loop()
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(max_connections):
        pool.put_nowait(None)  # a slot; a connection is opened on first use
    latencies: list[float] = []
    lags: list[float] = []
    errors = {"status": 0, "socket": 0, "timeout": 0}

    async def one(i: int, scheduled: float) -> None:
        conn = await pool.get()
        try:
            if conn is None:
                conn = await asyncio.open_connection(HOST, port)
            reader, writer = conn
            writer.write(payloads[i % len(payloads)])
            status = await asyncio.wait_for(_read_response(reader), timeout_s)
            latencies.append(loop.time() - scheduled)
            if status >= 400:
                errors["status"] += 1
            pool.put_nowait(conn)
        except TimeoutError:
            errors["timeout"] += 1
            _close(conn)
            pool.put_nowait(None)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            errors["socket"] += 1
            _close(conn)
            pool.put_nowait(None)

    tasks = []
    t0 = loop.time() + 0.05
    for i, off in enumerate(offsets):
        scheduled = t0 + float(off)
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(loop.time() - scheduled)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    _, pending = await asyncio.wait(tasks, timeout=timeout_s + 5) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    errors["timeout"] += len(pending)
    elapsed = loop.time() - t0
    while not pool.empty():
        _close(pool.get_nowait())
    return {"latencies": latencies, "lags": lags, "errors": errors, "elapsed": elapsed}


def _close(conn: tuple | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn[1].close()


def open_loop(port: int, requests: list[Request], *, rate: float, duration_s: float,
              max_connections: int = 256, timeout_s: float = 10.0, seed: int = 0) -> dict:
    """Poisson arrivals at `rate` requests/s for `duration_s`; latency from the scheduled send time."""
    rng = np.random.default_rng(seed)
    n = max(1, int(rate * duration_s * 1.2) + 10)
    offsets = np.cumsum(rng.exponential(1.0 / rate, n))
    offsets = offsets[offsets < duration_s]
    payloads = [_raw_request(r) for r in requests]
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    started, cpu_started = time.monotonic(), time.process_time()
    raw = runner(_open_loop(port, payloads, offsets, max_connections, timeout_s))
    client_cpu_s = time.process_time() - cpu_started
    lat = np.asarray(raw["latencies"]) * 1e3
    lags = np.asarray(raw["lags"]) * 1e3
    errs = raw["errors"]
    ok = len(lat) - errs["status"]
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    return {
        "mode": "open", "rate": rate, "duration_s": duration_s, "sent": len(offsets),
        "requests": len(lat), "ok": ok, "errors": errs["status"] + errs["socket"] + errs["timeout"],
        "errors_status": errs["status"], "errors_socket": errs["socket"] + errs["timeout"],
        "rps": ok / max(raw["elapsed"], duration_s),
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "p999_ms": pct(99.9),
        "mean_ms": float(lat.mean()) if len(lat) else float("nan"),
        "max_ms": float(lat.max()) if len(lat) else float("nan"),
        "client_lag_p99_ms": float(np.percentile(lags, 99)) if len(lags) else 0.0,
        "wall_s": time.monotonic() - started, "client_cpu_s": client_cpu_s,
    }
