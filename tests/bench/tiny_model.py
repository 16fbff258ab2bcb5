"""A tiny image classifier as a model repository, built with onnx.helper, for the benchmark's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CONFIG = """\
name = "tiny"
task = "image"
description = "a linear classifier over 28x28 pixels, for benchmark tests"
labels = ["a", "b", "c"]

[[inputs]]
name = "pixels"
datatype = "UINT8"
shape = [-1, 1, 28, 28]

[[outputs]]
name = "logits"
datatype = "FP32"
shape = [-1, 3]

[[outputs]]
name = "probabilities"
datatype = "FP32"
shape = [-1, 3]

[image]
width = 28
height = 28
color = "L"

[batching]
max_batch_size = 32
max_queue_delay_ms = 2.0
"""


def build_repository(root: Path) -> Path:
    """Write `root/tiny/{config.toml,1/model.onnx}` and return `root`."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((784, 3)).astype(np.float32) * 0.01, "w")
    shape = numpy_helper.from_array(np.array([-1, 784], dtype=np.int64), "flat_shape")
    nodes = [
        helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weight, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    model_dir = root / "tiny"
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_dir / "1" / "model.onnx")
    (model_dir / "config.toml").write_text(CONFIG)
    return root
