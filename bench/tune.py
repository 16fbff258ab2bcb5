"""Find the batching knobs (`max_batch_size`, `max_queue_delay_ms`, and for variable-length inputs
`max_padding_ratio`), and optionally the worker count, that serve a model best here.

Each candidate runs in a temporary model repository that links to the real model files and
overrides only the `[batching]` table of `config.toml`. Candidates are measured interleaved (one
service per candidate, all up at once, each point alternating between them) at a high concurrency
(throughput) and at concurrency 1 (the latency a lone request pays for the queue delay).
"""

from __future__ import annotations

import re
import statistics
import tempfile
import tomllib
from itertools import product
from pathlib import Path

from bench import load, servers
from bench.workloads import find_models, load_workload, requests_for


def _with_batching(config_text: str, batching: dict) -> str:
    """config.toml text with its [batching] table replaced by `batching` (other tables untouched)."""
    current = tomllib.loads(config_text).get("batching", {})
    merged = {**current, **batching}
    without = re.sub(r"(?ms)^\[batching\]\s*\n.*?(?=^\[|\Z)", "", config_text).rstrip()
    table = "\n".join(f"{k} = {v!r}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}"
                      for k, v in merged.items())
    return f"{without}\n\n[batching]\n{table}\n"


def candidate_repository(model_dir: Path, root: Path, batching: dict) -> Path:
    repo = root / "-".join(f"{k}{v}" for k, v in batching.items())
    target = repo / model_dir.name
    target.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name != "config.toml":
            (target / item.name).symlink_to(item.resolve())
    (target / "config.toml").write_text(_with_batching((model_dir / "config.toml").read_text(), batching))
    return repo


def run(repository: Path, model: str, *, max_batch_sizes: tuple[int, ...] = (8, 32, 64),
        delays_ms: tuple[float, ...] = (0.0, 1.0, 2.0, 5.0), padding_ratios: tuple[float, ...] = (),
        protocol: str = "v2-binary",
        concurrency: int = 64, duration_s: float = 5.0, reps: int = 3, worker_counts: tuple[int, ...] = (1,),
        provider: str = "cpu") -> list[dict]:
    model_dir = next(d for d in find_models(repository) if d.name == model)
    w = load_workload(model_dir)
    reqs = requests_for(w, protocol)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        started: list[tuple[dict, servers.Server]] = []
        try:
            for mbs, delay, ratio in product(max_batch_sizes, delays_ms, padding_ratios or (None,)):
                knobs = {"max_batch_size": mbs, "max_queue_delay_ms": delay}
                if ratio is not None:
                    knobs["max_padding_ratio"] = ratio
                repo = candidate_repository(model_dir, Path(tmp), knobs)
                for workers in worker_counts:
                    started.append(({"workers": workers, **knobs},
                                    servers.start_service(repo, workers=workers,
                                                          extra_args=["--providers", provider])))
            for _, srv in started:
                load.closed_loop(srv.port, reqs, concurrency=8, duration_s=1)
            measured: dict[int, dict[str, list[float]]] = {i: {"rps": [], "p99": [], "p50_c1": []}
                                                           for i in range(len(started))}
            for rep in range(reps):
                order = list(range(len(started)))
                order = order[rep % len(order):] + order[:rep % len(order)]
                for i in order:
                    srv = started[i][1]
                    servers.wait_idle(s for _, s in started)  # the previous candidate's backlog
                    hi = load.closed_loop(srv.port, reqs, concurrency=concurrency, duration_s=duration_s)
                    lo = load.closed_loop(srv.port, reqs, concurrency=1, duration_s=max(1.0, duration_s / 2))
                    measured[i]["rps"].append(hi["rps"])
                    measured[i]["p99"].append(hi["p99_ms"])
                    measured[i]["p50_c1"].append(lo["p50_ms"])
            for i, (knobs, _) in enumerate(started):
                m = measured[i]
                rows.append({**knobs, "rps": statistics.median(m["rps"]),
                             "p99_ms": statistics.median(m["p99"]),
                             "p50_c1_ms": statistics.median(m["p50_c1"])})
        finally:
            for _, srv in started:
                srv.stop()
    return sorted(rows, key=lambda r: -r["rps"])
