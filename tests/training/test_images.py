"""The served image models meet their bars on their real test sets, through the service's image codec,
and `python -m training <fashion-mnist|mnist> --fast` runs the whole pipeline end to end."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from service.codecs.image import to_pixels
from service.core.model_config import load_model_config
from training import images, zoo
from training.__main__ import main as training_main
from training.export import cpu_session, onnx_predict

MODELS = Path(__file__).resolve().parents[2] / "models"
BARS = {"fashion-mnist": 0.93, "mnist": 0.985}
TEST_SIZES = {"fashion-mnist": 10_000, "mnist": 10_000}
INVERT = {"fashion-mnist": "never", "mnist": "auto"}
LOADERS = {"fashion-mnist": images.load_fashion, "mnist": images.load_digits}


@pytest.fixture(scope="module", params=list(BARS))
def shipped(request):
    name = request.param
    model_dir = MODELS / name
    return name, model_dir, load_model_config(model_dir), LOADERS[name]()


def served_accuracy(model_dir: Path, config, test_images: np.ndarray, labels: np.ndarray) -> float:
    pixels = images.served_pixels(test_images, config.image)
    probabilities = onnx_predict(cpu_session(model_dir / "1" / "model.onnx"), {"pixels": pixels})
    return float((probabilities.argmax(1) == labels).mean())


def test_shipped_model_meets_its_bar_on_the_held_out_test_set(shipped):
    name, model_dir, config, data = shipped
    assert len(data.y_test) == TEST_SIZES[name]
    accuracy = served_accuracy(model_dir, config, data.x_test, data.y_test)
    assert accuracy >= BARS[name], f"{name}: {accuracy:.2%} < {BARS[name]:.1%}"
    # The model card reports what the service actually answers.
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    reported = float(re.search(r"test accuracy \| \*\*([\d.]+)%\*\*", card).group(1)) / 100
    assert abs(reported - accuracy) < 6e-5, f"card says {reported:.2%}, the graph scores {accuracy:.2%}"


def test_shipped_config_matches_the_graph_and_the_codec(shipped):
    name, model_dir, config, data = shipped
    assert config.task == "image"
    assert (config.image.width, config.image.height, config.image.color) == (28, 28, "L")
    assert config.image.invert == INVERT[name]
    assert [(i.name, i.datatype, i.shape) for i in config.inputs] == [("pixels", "UINT8", [-1, 1, 28, 28])]
    assert [(o.name, o.datatype, o.shape) for o in config.outputs] == [
        ("logits", "FP32", [-1, 10]), ("probabilities", "FP32", [-1, 10])]
    assert config.label_list(model_dir) == data.labels

    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert (graph_input.name, graph_input.type) == ("pixels", "tensor(uint8)")
    assert graph_input.shape[1:] == [1, 28, 28] and not isinstance(graph_input.shape[0], int)
    # A test image already at 28×28 passes through the codec untouched.
    assert np.array_equal(to_pixels(Image.fromarray(data.x_test[0]), config.image)[0], data.x_test[0])


def int8_weights(onnx_path: Path) -> int:
    """How many int8 initializers (quantized weights) the graph holds."""
    graph = onnx.load(str(onnx_path)).graph
    return sum(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)


def test_shipped_graph_is_int8_and_a_row_ignores_its_batch(shipped):
    """Static quantization fixes every activation scale, so batching cannot change an answer."""
    _name, model_dir, config, data = shipped
    onnx_path = model_dir / "1" / "model.onnx"
    assert int8_weights(onnx_path) >= 6  # five convolutions and two dense layers
    session = cpu_session(onnx_path, threads=1)
    rows = images.served_pixels(data.x_test[:64], config.image)
    batched = session.run(["logits"], {"pixels": rows})[0]
    alone = np.concatenate([session.run(["logits"], {"pixels": row[None]})[0] for row in rows])
    np.testing.assert_allclose(alone, batched, rtol=0, atol=1e-5)


def test_mnist_dark_on_light_digits_are_inverted_and_still_recognised():
    model_dir = MODELS / "mnist"
    config = load_model_config(model_dir)
    data = images.load_digits()
    drawn = 255 - data.x_test[:500]  # black ink on white paper, as people upload digits
    accuracy = served_accuracy(model_dir, config, drawn, data.y_test[:500])
    assert accuracy >= BARS["mnist"] - 0.01


@pytest.mark.parametrize("command", ["fashion-mnist", "mnist"])
def test_fast_training_trains_exports_and_checks_parity(tmp_path: Path, command: str):
    zoo_file = zoo.DOCS / "model-zoo" / f"image-{command}.json"
    zoo_before = zoo_file.read_bytes() if zoo_file.exists() else None

    assert training_main([command, "--fast", "--models", str(tmp_path)]) == 0  # parity raises on drift

    model_dir = tmp_path / command
    config = load_model_config(model_dir)
    assert config.inputs[0].name == "pixels"
    assert len(config.label_list(model_dir)) == 10
    for needed in ("README.md", "labels.txt", "confusion_matrix.png", "training_curves.png"):
        assert (model_dir / needed).exists(), needed
    session = cpu_session(model_dir / "1" / "model.onnx")
    batch = np.zeros((3, 1, 28, 28), dtype=np.uint8)
    logits, probabilities = session.run(["logits", "probabilities"], {"pixels": batch})
    assert logits.shape == probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert int8_weights(model_dir / "1" / "model.onnx") >= 6
    # The smoke test writes only into the directory it was given.
    assert (zoo_file.read_bytes() if zoo_file.exists() else None) == zoo_before


def test_a_low_resolution_copy_is_an_8x8_thumbnail_of_the_ink_drawn_again_as_mnist_was():
    from training.image_data import mnist_style, thumbnail
    from training.images import Augment

    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 13:15] = 255  # a "1": 20 rows tall, 2 columns wide
    small = thumbnail(digit)
    assert small.shape == (8, 8) and 0 < small.max() <= 16 and small.min() == 0
    # The square around the ink keeps the stroke narrow: only the middle columns hold ink.
    assert set(np.flatnonzero(small.any(0)).tolist()) <= {3, 4} and small.any(1).all()
    batch = torch.from_numpy(np.stack([digit, digit[::-1].T.copy()]))[:, None]
    seen = Augment(shift=0.0, lowres=1.0)(batch, torch.Generator().manual_seed(0))
    for image, out in zip(batch, seen, strict=True):
        assert np.array_equal(out[0].numpy(), mnist_style(thumbnail(image[0].numpy())))
    assert torch.equal(Augment(shift=0.0, lowres=0.0)(batch, torch.Generator()), batch)
