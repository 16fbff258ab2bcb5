"""The model zoo: every architecture trained for a task, measured the same way, in docs/model-zoo.md.

Each task writes its rows to `docs/model-zoo/<task>.json`; `render()` rebuilds the markdown from all
of them, so tasks can be retrained independently. The page's other sections (out of domain and
calibration, notes on retrains) are kept as they are, after the tables.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from training.export import cpu_session
from training.report import measured_with

DOCS = Path(__file__).resolve().parent.parent / "docs"
TASK_TITLES = {"image-fashion-mnist": "Images: Fashion-MNIST", "image-mnist": "Images: MNIST digits",
               "text": "Text: review sentence polarity", "speech": "Speech: spoken digits"}


@dataclass(frozen=True)
class ZooRow:
    architecture: str
    parameters: int
    test_accuracy: float
    training_seconds: float
    # None where an architecture has no ONNX graph (e.g. a scikit-learn baseline); rendered as "—".
    onnx_bytes: int | None
    latency_b1_ms: float | None
    latency_b32_ms: float | None
    served: bool = False
    # ONNX Runtime version, provider, optimization level and CPU the figures ran on (report.measured_with)
    measured_with: str | None = None


def median_latency_ms(onnx_path: Path, feeds: dict[str, np.ndarray], repeats: int = 50) -> float:
    """Median wall time of one `session.run` on `feeds`, in milliseconds, after a warm-up."""
    session = cpu_session(onnx_path)
    for _ in range(5):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def graph_row(architecture: str, parameters: int, accuracy: float, seconds: float, path: Path,
              feeds: Callable[[int], dict[str, np.ndarray]], served: bool = False) -> ZooRow:
    """A row for an architecture exported to `path`; `feeds(n)` gives a batch of n test inputs."""
    return ZooRow(architecture, parameters, accuracy, seconds, path.stat().st_size,
                  median_latency_ms(path, feeds(1)), median_latency_ms(path, feeds(32)), served=served)


def save_rows(task: str, rows: list[ZooRow]) -> None:
    folder = DOCS / "model-zoo"
    folder.mkdir(parents=True, exist_ok=True)
    where = measured_with()
    rows = [r if r.measured_with else replace(r, measured_with=where) for r in rows]
    (folder / f"{task}.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    render()


def _or_dash(value: float | None, fmt: Callable[[float], str]) -> str:
    return "—" if value is None else fmt(value)


def render() -> None:
    parts = [
        "# Model zoo\n",
        "Every architecture below was trained by `python -m training` on the same data and split as the",
        "served model, and measured the same way: test accuracy on the held-out split, training time on",
        "a 2-core CPU machine, ONNX file size, and the median ONNX Runtime CPU latency of one",
        "`session.run` at batch 1 and batch 32 (2 threads). The **served** row is the one in `models/`.",
        "Each task names the ONNX Runtime version, execution provider, graph optimization level and CPU",
        "(its widest instruction set that changes ORT's kernels: AVX2, AVX-512, VNNI) its figures ran on;",
        "the served int8 image graphs score the same on every x86-64 CPU, the float graphs within a test",
        "row or two (tests/training/test_cpu_portability.py).\n",
    ]
    for task, title in TASK_TITLES.items():
        path = DOCS / "model-zoo" / f"{task}.json"
        if not path.exists():
            continue
        rows = [ZooRow(**r) for r in json.loads(path.read_text())]
        parts.append(f"## {title}\n")
        machines = sorted({r.measured_with or "not recorded (measured before the figures named it)"
                           for r in rows})
        parts.append(f"Measured with: {'; '.join(machines)}.\n")
        parts.append("| architecture | parameters | test accuracy | training time | ONNX size "
                     "| latency batch 1 | latency batch 32 |")
        parts.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            name = f"**{r.architecture}** (served)" if r.served else r.architecture
            parts.append(
                f"| {name} | {r.parameters:,} | {r.test_accuracy:.2%} | {r.training_seconds / 60:.1f} min "
                f"| {_or_dash(r.onnx_bytes, lambda b: f'{b / 1e6:.2f} MB')} "
                f"| {_or_dash(r.latency_b1_ms, lambda t: f'{t:.3f} ms')} "
                f"| {_or_dash(r.latency_b32_ms, lambda t: f'{t:.3f} ms')} |"
            )
        parts.append("")
    page = DOCS / "model-zoo.md"
    kept = _other_sections(page.read_text()) if page.exists() else ""
    page.write_text("\n".join(parts) + (f"\n{kept}\n" if kept else ""))


def _other_sections(page: str) -> str:
    """The `## ` sections of the page that no task's rows make, as they are."""
    made = {f"## {title}" for title in TASK_TITLES.values()}
    kept: list[str] = []
    keep = False
    for line in page.splitlines():
        if line.startswith("## "):
            keep = line.rstrip() not in made
        if keep:
            kept.append(line)
    return "\n".join(kept).rstrip("\n")
