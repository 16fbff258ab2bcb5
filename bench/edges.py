"""`python -m bench.edges`: what the front-end's cheap refusals and clean drains cost and deliver.

    python -m bench.edges --repository models --model fashion-mnist

- big-body: a ~31 MB V2 JSON body declaring [20000, 1, 28, 28] rows (over max_batch_size): time to
  the 400 and the worker's RSS, alone, then from four clients sending such bodies back to back for
  2.5 s while another process probes /v2/health/live every 2 ms;
- no-key: a request announcing a 30 MiB body without a key, against --api-keys-file: time to the 401
  with no byte of the body sent;
- quota: 100 concurrent requests of a key limited to 20/s, and of an unlimited key;
- drain: SIGTERM under 16 closed-loop clients on keep-alive connections, with 1 and 2 workers:
  every outcome, none of which may be a request sent and left unanswered.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http.client
import json
import multiprocessing
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.servers import start_service

_ARGS = ["--intra-op-threads", "1", "--drain-grace-s", "1"]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _send_raw(port: int, data: bytes) -> tuple[float, bytes]:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        with contextlib.suppress(OSError):  # answered and closed before it took everything
            s.sendall(data)
        answer = s.recv(4096)
    return time.perf_counter() - start, answer.split(b"\r\n", 1)[0]


def _probe(port: int, seconds: float, out: multiprocessing.Queue) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        conn.request("GET", "/v2/health/live")
        conn.getresponse().read()
        latencies.append(time.perf_counter() - start)
        time.sleep(0.002)
    out.put(latencies)


def big_body(repository: Path, model: str) -> dict:
    rows = 20_000
    body = b'{"inputs":[{"name":"pixels","datatype":"UINT8","shape":[%d,1,28,28],"data":[' % rows \
        + b",".join([b"0"] * (rows * 784)) + b"]}]}"
    request = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with start_service(repository, extra_args=_ARGS) as server:
        pid = server.proc.pid
        before = _rss_mib(pid)
        alone, status = _send_raw(server.port, request)
        after_one = _rss_mib(pid)
        queue: multiprocessing.Queue = multiprocessing.Queue()
        prober = multiprocessing.Process(target=_probe, args=(server.port, 3.0, queue))
        prober.start()
        time.sleep(0.25)
        results: list[tuple[float, bytes]] = []
        peak = [after_one]
        end = time.monotonic() + 2.5

        def sender() -> None:
            while time.monotonic() < end:
                results.append(_send_raw(server.port, request))

        senders = [threading.Thread(target=sender) for _ in range(4)]
        for t in senders:
            t.start()
        while any(t.is_alive() for t in senders):
            peak[0] = max(peak[0], _rss_mib(pid))
            time.sleep(0.002)
        latencies = sorted(queue.get())
        prober.join()
    times = sorted(t for t, _ in results)
    return {"body_mb": round(len(body) / 1e6, 2), "status": status.decode(),
            "alone_ms": round(alone * 1000, 1), "rss_before_mib": round(before),
            "rss_after_mib": round(after_one),
            "four_senders_for_2_5_s": {"bodies": len(results),
                                       "statuses": sorted({s.decode() for _, s in results}),
                                       "p50_ms": round(statistics.median(times) * 1000, 1),
                                       "max_ms": round(times[-1] * 1000, 1)},
            "rss_peak_during_four_mib": round(peak[0]),
            "live_probes": len(latencies), "live_p50_ms": round(statistics.median(latencies) * 1000, 2),
            "live_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
            "live_max_ms": round(latencies[-1] * 1000, 2)}


def keys(repository: Path, model: str) -> dict:
    from service.auth.keys import create_key, parse_scopes

    with tempfile.TemporaryDirectory() as d:
        keys_file = Path(d) / "keys.toml"
        limited = create_key(keys_file, "limited", parse_scopes("infer"), rate=20)
        free = create_key(keys_file, "free", parse_scopes("infer"))
        with start_service(repository, extra_args=[*_ARGS, "--api-keys-file", str(keys_file)]) as server:
            head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {30 * 1024 * 1024}\r\n\r\n").encode()
            no_key = [_send_raw(server.port, head) for _ in range(5)]

            async def burst(secret: str) -> collections.Counter:
                import httpx

                async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as c:
                    rs = await asyncio.gather(*[c.get(f"/v2/models/{model}",
                                                      headers={"Authorization": f"Bearer {secret}"})
                                                for _ in range(100)])
                return collections.Counter(r.status_code for r in rs)

            limited_codes = asyncio.run(burst(limited))
            free_codes = asyncio.run(burst(free))
    return {"no_key_30mib_announced": {"status": no_key[0][1].decode(),
                                       "ms": [round(t * 1000, 2) for t, _ in no_key]},
            "limited_20_per_s_100_at_once": dict(limited_codes), "unlimited_100_at_once": dict(free_codes)}


def drain(repository: Path, model: str, workers: int, clients: int = 16) -> dict:
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                   "data": [0] * 784}]}).encode()
    outcomes: collections.Counter = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    server = start_service(repository, workers=workers, extra_args=_ARGS)

    def client() -> None:
        conn = None
        while not stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
                try:
                    conn.connect()
                except OSError:
                    with lock:
                        outcomes["connection refused"] += 1
                    conn = None
                    time.sleep(0.01)
                    continue
            try:
                conn.request("POST", f"/v2/models/{model}/infer", body=body,
                             headers={"Content-Type": "application/json"})
            except OSError:
                with lock:
                    outcomes["not sent"] += 1
                conn = None
                continue
            try:
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    outcomes[f"UNANSWERED ({type(e).__name__})"] += 1
                conn = None
                continue
            with lock:
                outcomes[str(response.status)] += 1
            if response.will_close:
                conn.close()
                conn = None

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(60)
    exit_s = time.monotonic() - start
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(30)
    server.stop()
    return {"workers": workers, "clients": clients, "grace_s": 1, "outcomes": dict(outcomes),
            "exit_after_sigterm_s": round(exit_s, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.edges", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fashion-mnist", help="a model with a [B,1,28,28] UINT8 input")
    parser.add_argument("--only", choices=("big-body", "keys", "drain"))
    args = parser.parse_args(argv)
    result: dict = {}
    if args.only in (None, "big-body"):
        result["big_body"] = big_body(args.repository, args.model)
    if args.only in (None, "keys"):
        result["keys"] = keys(args.repository, args.model)
    if args.only in (None, "drain"):
        result["drain"] = [drain(args.repository, args.model, w) for w in (1, 2)]
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
