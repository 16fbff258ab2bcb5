"""Where training data comes from and where its parsed form is kept.

Every source file is checked against a sha256 recorded in the code that uses it, and parsed arrays
are cached (outside git) so later runs and the tests skip the parsing. The cache lives in
`$NEUROSERVE_DATA_DIR`, default `~/.cache/neuroserve`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np


class DataMissing(RuntimeError):
    """A data source is not on this machine; the message names the package that provides it."""


def cache_dir() -> Path:
    root = Path(os.environ.get("NEUROSERVE_DATA_DIR", Path.home() / ".cache" / "neuroserve"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def fp32_graph(model: str, seed: int) -> Path:
    """Where training keeps a model's FP32 graph (not shipped): to re-quantize or benchmark it
    without retraining."""
    return cache_dir() / f"{model}-seed{seed}-fp32.onnx"


PROJECT_MODELS = Path(__file__).resolve().parents[1] / "models"


def ships(models: Path) -> bool:
    """Whether a run writes the project's own `models/`: only such a run may replace what the data
    cache keeps of the shipped models (an experiment writes another repository)."""
    return models.resolve() == PROJECT_MODELS


def keep_fp32_graph(source: Path, model: str, seed: int, models: Path) -> None:
    """Keep `source` as `fp32_graph(model, seed)` when the run wrote the project's own `models/`:
    a run into another repository (an experiment) must not replace the graph the shipped model was
    made from, which `python -m training evaluate --alternatives` compares against."""
    if ships(models):
        shutil.copyfile(source, fp32_graph(model, seed))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verified(path: Path, expected_sha256: str, *, provided_by: str) -> Path:
    """Return `path` if it exists with the expected checksum; otherwise say how to get it."""
    if not path.exists():
        raise DataMissing(f"{path} is missing; it is provided by {provided_by}")
    actual = sha256(path)
    if actual != expected_sha256:
        raise DataMissing(
            f"{path} has sha256 {actual}, expected {expected_sha256}; reinstall {provided_by}"
        )
    return path


def cached_arrays(name: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load `name.npz` from the cache, or build it once with `build()` and store it."""
    path = cache_dir() / f"{name}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    arrays = build()
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return arrays
