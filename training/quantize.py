"""INT8 quantization of ONNX graphs, always with answers that do not depend on the batch.

ONNX Runtime's `quantize_dynamic` quantizes activations with one scale computed per call from the
whole input tensor. A row's answer then depends on the other rows and the padding in its batch,
which a dynamically batching server must not allow. So:

- `quantize_weights_int8` (the text model): only the weights are stored as int8 (symmetric, one
  scale per output channel of a MatMul and per row of an embedding table) and dequantized inside
  the graph; every row is computed in float32 on its own. Smaller files, the same arithmetic.
- `quantize_static_int8` (the image CNNs): convolutions and matrix products run in int8, with every
  activation scale a constant of the graph, measured once on calibration batches of training data.
  Smaller and faster on CPUs with int8 dot-product instructions (VNNI), still row-independent.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process


def _quantize(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along `axis`: w ≈ q * scale."""
    reduce = tuple(d for d in range(w.ndim) if d != axis)
    scale = np.abs(w).max(axis=reduce) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def quantize_weights_int8(src: Path, dst: Path, *, min_elements: int = 16384) -> None:
    """Store the MatMul weights and Gather tables of at least `min_elements` values as int8.

    MatMul(x, W) becomes MatMul(x, DequantizeLinear(Wq, scale, axis=1)); Gather(T, ids) becomes
    Cast(Gather(Tq, ids)) * Gather(scale, ids), so only the looked-up rows are dequantized.
    """
    model = onnx.load(str(src))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    def candidate(name: str) -> np.ndarray | None:
        # Only initializers this one node reads, so replacing them cannot change another node.
        if name not in initializers or uses[name] != 1:
            return None
        w = numpy_helper.to_array(initializers[name])
        return w if w.dtype == np.float32 and w.ndim == 2 and w.size >= min_elements else None

    nodes, removed, added = [], set(), []
    for node in graph.node:
        if node.op_type == "MatMul" and (w := candidate(node.input[1])) is not None:
            name = node.input[1]
            q, scale = _quantize(w, axis=1)
            added += [numpy_helper.from_array(q, f"{name}_int8"),
                      numpy_helper.from_array(scale, f"{name}_scale"),
                      numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero")]
            nodes.append(helper.make_node("DequantizeLinear",
                                          [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
                                          [f"{name}_dequantized"], axis=1))
            node.input[1] = f"{name}_dequantized"
            removed.add(name)
        elif (node.op_type == "Gather" and not any(a.name == "axis" and a.i != 0 for a in node.attribute)
              and (w := candidate(node.input[0])) is not None):
            name, ids, out = node.input[0], node.input[1], node.output[0]
            q, scale = _quantize(w, axis=0)
            added += [numpy_helper.from_array(q, f"{name}_int8"),
                      numpy_helper.from_array(scale, f"{name}_scale"),
                      numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{name}_last_axis")]
            nodes += [
                helper.make_node("Gather", [f"{name}_int8", ids], [f"{out}_int8"], axis=0),
                helper.make_node("Cast", [f"{out}_int8"], [f"{out}_float"], to=onnx.TensorProto.FLOAT),
                helper.make_node("Gather", [f"{name}_scale", ids], [f"{out}_row_scale"], axis=0),
                helper.make_node("Unsqueeze", [f"{out}_row_scale", f"{name}_last_axis"], [f"{out}_scale"]),
                helper.make_node("Mul", [f"{out}_float", f"{out}_scale"], [out]),
            ]
            removed.add(name)
            continue
        nodes.append(node)

    kept = [init for init in graph.initializer if init.name not in removed]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))


class _Batches(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_static_int8(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> None:
    """Conv, MatMul and Gemm in int8 (QDQ form: per-channel symmetric weights, uint8 activations
    whose ranges are the min/max seen on the `calibration` feeds)."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and ORT's own graph optimizations first, so BatchNorm is folded into the
        # convolution it follows and gets quantized with it.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(dst), _Batches(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)
