"""training.data_cache: what a training run keeps outside git."""

from __future__ import annotations

from pathlib import Path

import pytest

from training import data_cache


def test_only_a_run_into_the_projects_models_replaces_the_kept_fp32_graph(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUROSERVE_DATA_DIR", str(tmp_path / "cache"))
    graph = tmp_path / "model_fp32.onnx"
    graph.write_bytes(b"the experiment's graph")
    data_cache.keep_fp32_graph(graph, "mnist", 0, tmp_path / "scratch-models")
    assert not data_cache.fp32_graph("mnist", 0).exists()
    data_cache.keep_fp32_graph(graph, "mnist", 0, data_cache.PROJECT_MODELS)
    assert data_cache.fp32_graph("mnist", 0).read_bytes() == b"the experiment's graph"
