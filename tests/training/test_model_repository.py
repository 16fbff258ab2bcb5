"""The shipped model repository is complete and every model's config agrees with its graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.core.model_config import V2_TO_NUMPY, ModelConfig, load_model_config

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED = {"fashion-mnist": "image", "mnist": "image", "sentiment": "text", "spoken-digits": "speech"}
ORT_TYPES = {f"tensor({t})": v for t, v in {
    "uint8": "UINT8", "int64": "INT64", "int32": "INT32", "float": "FP32", "float16": "FP16",
    "double": "FP64", "bool": "BOOL", "int8": "INT8"}.items()}


def model_dirs() -> list[Path]:
    return sorted(p for p in MODELS.iterdir() if (p / "config.toml").exists())


def latest_onnx(model_dir: Path) -> Path:
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    assert versions, f"{model_dir} has no integer version directory"
    return model_dir / str(versions[-1]) / "model.onnx"


def test_repository_ships_the_four_models_with_their_tasks():
    found = {p.name: load_model_config(p).task for p in model_dirs()}
    assert found == SHIPPED


@pytest.mark.parametrize("model_dir", model_dirs(), ids=lambda p: p.name)
def test_config_matches_onnx_graph(model_dir: Path):
    config: ModelConfig = load_model_config(model_dir)
    assert config.name == model_dir.name
    path = latest_onnx(model_dir)
    assert path.stat().st_size <= 30 * 1024 * 1024, "served graphs stay under 30 MB"
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    opset = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for specs, actual in ((config.inputs, session.get_inputs()), (config.outputs, session.get_outputs())):
        assert [s.name for s in specs] == [a.name for a in actual]
        for spec, arg in zip(specs, actual, strict=True):
            assert ORT_TYPES[arg.type] == spec.datatype, spec.name
            assert len(arg.shape) == len(spec.shape), spec.name
            for want, got in zip(spec.shape, arg.shape, strict=True):
                assert (want == -1) == (not isinstance(got, int)), f"{spec.name}: {spec.shape} vs {arg.shape}"
                if want != -1:
                    assert want == got

    labels = config.label_list(model_dir)
    assert len(labels) == len(set(labels))
    for out in config.outputs:
        assert out.shape[-1] == len(labels), f"{out.name} width must equal the label count"


@pytest.mark.parametrize("model_dir", model_dirs(), ids=lambda p: p.name)
def test_probabilities_output_is_a_distribution(model_dir: Path):
    config = load_model_config(model_dir)
    session = ort.InferenceSession(str(latest_onnx(model_dir)), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in config.inputs:
        shape = [3 if d == -1 else d for d in spec.shape]
        dtype = V2_TO_NUMPY[spec.datatype]
        if spec.name == "attention_mask":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        elif np.issubdtype(np.dtype(dtype), np.integer):
            feeds[spec.name] = rng.integers(0, 100, size=shape).astype(dtype)
        else:
            feeds[spec.name] = (rng.standard_normal(shape) * 0.1).astype(dtype)
    probabilities = session.run([config.scores_output], feeds)[0]
    assert probabilities.shape == (3, len(config.label_list(model_dir)))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert (probabilities >= 0).all()


@pytest.mark.parametrize("model_dir", model_dirs(), ids=lambda p: p.name)
def test_model_card_has_its_figures(model_dir: Path):
    card = (model_dir / "README.md").read_text()
    for needed in ("sha256", "accuracy", "precision", "recall"):
        assert needed in card.lower(), f"model card lacks {needed}"
    for image in ("confusion_matrix.png", "training_curves.png"):
        assert (model_dir / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
