"""The benchmark harness end to end, for a few seconds, on a tiny model: it must produce sane numbers.

Measures nothing about performance (timed targets are checked by `python -m bench`, not by tests);
it pins that the harness runs, talks to the servers, and reads results back correctly.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import report, servers, soak, suite
from bench.__main__ import main
from bench.servers import service_available
from tests.bench.tiny_model import build_repository

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (Debian package `wrk`)")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("bench")
    repo = build_repository(root / "models")
    plan = suite.Plan(
        repository=repo, concurrencies=(1, 8), open_rate_fractions=(0.3,), max_open_rate=300,
        duration_s=1, warmup_s=0, reps=1, raw_duration_s=0.2, raw_batch_sizes=(1, 8),
        protocols=("v2-json", "v2-binary", "task"), out=root / "out", log=False, command="smoke",
    )
    return suite.run(plan), root


def test_harness_measures_every_configuration_without_errors(results: tuple[dict, Path]) -> None:
    res, _ = results
    configs = {p["config"] for p in res["points"]}
    assert "reference/v2-json" in configs
    if service_available():
        assert {"service/v2-json", "service/v2-binary", "service/task"} <= configs
    for p in res["points"]:
        assert p["requests"] > 0, p
        assert p["errors"] == 0, p
        assert p["rps"] > 0, p
        assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"], p
    assert {p["mode"] for p in res["points"]} == {"closed", "open"}


def test_raw_ceiling_is_measured_per_batch_size(results: tuple[dict, Path]) -> None:
    raw = results[0]["raw"]["tiny"]
    assert [p["batch_size"] for p in raw["points"]] == [1, 8]
    assert all(p["samples_per_s"] > 0 and p["p50_ms"] <= p["p99_ms"] for p in raw["points"])
    assert raw["best_samples_per_s"] == max(p["samples_per_s"] for p in raw["points"])
    # Measured again at the best batch size before each repetition's load points (reps=1 here).
    again = raw["interleaved"]
    assert again["batch_size"] == raw["best_batch_size"]
    assert len(again["samples_per_s"]) == 1 and again["samples_per_s"][0] > 0
    assert report.ceiling_samples_per_s(raw) == again["samples_per_s"][0]
    # ... each time once the servers are idle, as every load point is (see the next test).
    assert len(again["settle_s"]) == 1
    assert all(p["settle_s"] >= 0.2 for p in results[0]["points"])  # at least one quiet window


def test_measurements_wait_for_the_servers_to_finish_earlier_work() -> None:
    """A server still computing what the last load point left in flight must not share the cores
    with the next measurement: `wait_idle` returns only once its CPU use has stopped."""
    busy_s = 0.8
    code = ("import sys, time\n"
            "print('busy', flush=True)\n"
            f"end = time.monotonic() + {busy_s}\n"
            "while time.monotonic() < end: pass\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    with servers.Server("busy", proc, port=0) as busy:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "busy"
        waited = servers.wait_idle([busy], timeout_s=10)
        assert busy_s - 0.3 <= waited < 10
        after = busy.cpu_seconds()
        time.sleep(0.3)
        assert busy.cpu_seconds() - after <= 0.05
        # An idle server costs one quiet window.
        assert servers.wait_idle([busy]) < 1.0


def test_service_histograms_are_read_back_from_metrics(results: tuple[dict, Path]) -> None:
    if not service_available():
        pytest.skip("the service is not in this checkout yet")
    points = [p for p in results[0]["points"] if p["server"] == "service" and p["mode"] == "closed"]
    assert points
    for p in points:
        batch = p["server_metrics"]["batch_size"]
        assert batch["count"] > 0
        assert 1 <= batch["mean"] <= 32
        assert p["server_metrics"]["queue_s"]["count"] >= batch["count"]


def test_server_cpu_is_split_between_event_loop_and_compute(results: tuple[dict, Path]) -> None:
    points = results[0]["points"]
    for p in points:
        assert p["server_loop_cpu_ms_per_request"] > 0, p
    if not service_available():
        return

    def cpu_ms(server: str, key: str) -> float:
        return sum(p[key] * p["requests"] for p in points if p["server"] == server)

    # The service runs ONNX Runtime on its batchers' threads, so part of its CPU is off the loop;
    # the reference server calls it inside the handler, on the loop.
    service_loop_share = cpu_ms("service", "server_loop_cpu_ms_per_request") / cpu_ms(
        "service", "server_cpu_ms_per_request")
    reference_loop_share = cpu_ms("reference", "server_loop_cpu_ms_per_request") / cpu_ms(
        "reference", "server_cpu_ms_per_request")
    assert service_loop_share < reference_loop_share


def test_load_generator_cpu_and_machine_share_are_measured(results: tuple[dict, Path]) -> None:
    for p in results[0]["points"]:
        # wrk (closed loop) and the asyncio client (open loop) use CPU for every request they send
        assert p["client_cpu_ms_per_request"] > 0, p
        # a share of all cores over the point's wall time; /proc and getrusage count in 10 ms ticks
        assert 0 < p["cpu_busy"] <= 1.15, p
    # At concurrency 8 every side of a 1-s point is busy: the machine is far from idle.
    closed = [p["cpu_busy"] for p in results[0]["points"] if p["mode"] == "closed" and p["concurrency"] == 8]
    assert closed and min(closed) > 0.2, closed


def test_report_renders_tables_and_plot_outside_docs(results: tuple[dict, Path]) -> None:
    res, root = results
    doc = root / "out" / "benchmarks.md"
    report.write(root / "out" / "results.json", doc)
    text = doc.read_text()
    assert "reference/v2-json" in text and "`smoke`" in text and "### Closed loop" in text
    assert "measured again before each repetition's load points (each once the servers had gone idle)" in text
    # server CPU (event loop) | client CPU | busy
    assert re.search(r"\| service/v2-json \| 8 \|.*\| [\d.]+ \([\d.]+\) \| [\d.]+ \| \d+% \|$", text,
                     re.MULTILINE)
    assert (root / "out" / "latency_vs_throughput.png").stat().st_size > 1000
    rows = report.medians(res["points"])
    assert all(not math.isnan(r["rps"]) for r in rows)


@pytest.mark.skipif(not service_available(), reason="needs the service's dependencies")
def test_soak_beyond_the_open_loop_clients_reach_runs_closed_loop(
        results: tuple[dict, Path], tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "models")
    res = soak.run(repo, model="tiny", duration_s=4, window_s=1, fraction=0.5, max_rate=10.0,
                   out=tmp_path / "out", log=False)
    assert res["target_rps"] > 10.0  # half the peak is beyond a 10 req/s client: wrk takes over
    assert res["mode"].startswith("closed loop at concurrency ")
    assert res["errors"] == 0 and res["requests"] > 0
    assert len(res["samples"]) >= 3 and all(s["rss_mib"] for s in res["samples"])
    assert res["rate"] > 10.0
    line = next(ln for ln in report.generated({**results[0], "soak": res}, "x.png").splitlines()
                if ln.startswith("- Soak ("))
    assert "closed loop at concurrency" in line and f"{res['rate']:.0f} req/s" in line


@pytest.mark.skipif(not service_available(), reason="needs the service's dependencies")
def test_no_reference_measures_the_service_alone(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "models")
    out = tmp_path / "out"
    argv = ["all", "--repository", str(repo), "--out", str(out), "--no-reference", "--quick",
            "--concurrency", "2", "--rates", "", "--duration", "0.5", "--reps", "1", "--soak", "0",
            "--protocols", "v2-binary", "--no-report"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert {p["config"] for p in res["points"]} == {"service/v2-binary"}
    assert all(p["errors"] == 0 and p["requests"] > 0 for p in res["points"])
    assert "reference_idle_rss_mib" not in res["memory"]
    with pytest.raises(SystemExit):
        main(["all", "--no-service", "--no-reference"])


@pytest.mark.skipif(not service_available(), reason="needs the service's dependencies")
def test_tune_measures_every_worker_count(tmp_path: Path, capsys) -> None:
    repo = build_repository(tmp_path / "models")
    out = tmp_path / "out"
    argv = ["tune", "--repository", str(repo), "--model", "tiny", "--out", str(out), "--max-batch-sizes",
            "4", "--delays-ms", "0", "--worker-counts", "1,2", "--concurrency", "4", "--duration", "0.5",
            "--reps", "1"]
    assert main(argv) == 0
    rows = json.loads((out / "tune-tiny.json").read_text())
    assert sorted((r["workers"], r["max_batch_size"]) for r in rows) == [(1, 4), (2, 4)]
    assert all(r["rps"] > 0 and r["p50_c1_ms"] > 0 for r in rows)
    assert "| workers | max_batch_size |" in capsys.readouterr().out


def test_int8_command_compares_the_served_graph_with_its_cached_fp32_graph(tmp_path, monkeypatch):
    repo = build_repository(tmp_path / "models")
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("NEUROSERVE_DATA_DIR", str(cache))
    out = tmp_path / "int8.json"
    args = ["int8", "--repository", str(repo), "--models", "tiny", "--threads", "1", "--rounds", "1",
            "--out", str(out)]
    with pytest.raises(FileNotFoundError, match="python -m training tiny"):
        main(args)  # no FP32 graph in the cache: says which command leaves it there
    shutil.copyfile(repo / "tiny" / "1" / "model.onnx", cache / "tiny-seed0-fp32.onnx")
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert "CPUExecutionProvider" in result["machine"]
    assert result["command"].startswith("python -m bench int8")
    (run,) = result["runs"]
    assert [p["batch_size"] for p in run["points"]] == [1, 16]
    for p in run["points"]:
        assert p["int8_ms"] > 0 and p["fp32_ms"] > 0
        assert p["speedup"] == pytest.approx(p["fp32_ms"] / p["int8_ms"])


def test_cuda_options_runs_its_variants_on_the_cpu_and_its_bound_call_answers_as_run(tmp_path: Path) -> None:
    import numpy as np

    from bench import cuda_options
    from bench.workloads import load_workload, model_file

    repo = build_repository(tmp_path / "models")
    result = cuda_options.run(repo, ["tiny"], batch=4, duration_s=0.2, provider="cpu")
    row = result["rows"][0]
    for variant in ("run", "io_binding", "two_sessions"):
        assert row[variant]["samples_per_s"] > 0, row
    assert "skipped" in row["cuda_graph"]
    feeds = load_workload(repo / "tiny", n=4).batch(4)
    sess = cuda_options._session(model_file(repo / "tiny"), "cpu")
    bound = cuda_options._bound_call(sess, feeds, "cpu")()
    for got, want in zip(bound, sess.run(None, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
