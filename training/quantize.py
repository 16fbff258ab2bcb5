"""INT8 quantization of ONNX graphs whose answers depend neither on the batch nor on the CPU.

ONNX Runtime's `quantize_dynamic` quantizes activations with one scale computed per call from the
whole input tensor. A row's answer then depends on the other rows and the padding in its batch,
which a dynamically batching server must not allow. And the same int8 graph must give the same
answer on every x86-64 CPU a container may land on. So:

- `quantize_weights_int8` (the text model): only the weights are stored as int8 (symmetric, one
  scale per output channel of a MatMul and per row of an embedding table) and turned back into
  float32 inside the graph with Cast and Mul, not DequantizeLinear. ONNX Runtime fuses
  DequantizeLinear → MatMul into MatMulNBits, whose default `accuracy_level` 4 quantizes the
  activations to int8 per row in kernels that differ between AVX2 and AVX-512 VNNI (measured:
  logits 0.04 apart between the two, 0.12 from the float graph). Cast and Mul of constants are
  folded at load instead, so every MatMul runs in float32 on every CPU: smaller files, the same
  arithmetic as the float graph.
- `quantize_static_int8` (the image CNNs): convolutions and matrix products run in int8, with every
  activation scale a constant of the graph, measured once on calibration batches of training data,
  so a row's answer ignores its batch. Weights use 7 bits (|w| ≤ 64): ONNX Runtime computes
  uint8 × int8 products on AVX2 and AVX-512 without VNNI with `vpmaddubsw`, which adds pairs of
  products in saturating 16-bit lanes. 255 · 127 · 2 = 64,770 overflows them; 255 · 64 · 2 = 32,640
  cannot, so those kernels compute exactly what VNNI's 32-bit `vpdpbusd` does (`check_int8_portable`).
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

    MatMul(x, W) becomes MatMul(x, Cast(Wq) * scale), folded into a float32 weight when ONNX Runtime
    loads the graph; Gather(T, ids) becomes Cast(Gather(Tq, ids)) * Gather(scale, ids), so only the
    looked-up rows are turned back into float32.
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
                      numpy_helper.from_array(scale, f"{name}_scale")]
            nodes += [  # scale [N] broadcasts over the last axis of W [K, N]: one scale per column
                helper.make_node("Cast", [f"{name}_int8"], [f"{name}_float"], to=onnx.TensorProto.FLOAT),
                helper.make_node("Mul", [f"{name}_float", f"{name}_scale"], [f"{name}_dequantized"]),
            ]
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
    check_int8_portable(dst)


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
                        reduce_range=True, op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)
    check_int8_portable(dst)


# The widest int8 weight whose products with uint8 activations, added in pairs, fit a signed 16-bit
# lane: 255 · 64 · 2 = 32,640 ≤ 32,767.
MAX_PORTABLE_WEIGHT = 64
_INT8_COMPUTE = {"Conv", "MatMul", "Gemm"}


class NotPortable(ValueError):
    """An int8 graph whose answer may depend on the CPU's instruction set."""


def check_int8_portable(path: Path) -> None:
    """Raise NotPortable unless every int8 computation of the graph gives the same result on AVX2,
    AVX-512 and VNNI kernels, whatever optimization ONNX Runtime applies.

    A DequantizeLinear of weights that feeds Conv/MatMul/Gemm is fused into an integer kernel. Its
    input must be a uint8 activation of the graph (a dequantized constant scale): without one, ORT
    quantizes the activations itself at run time (MatMulNBits). And int8 weights must lie within
    ±MAX_PORTABLE_WEIGHT, so that every pair sum fits 16 bits.
    """
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    problems = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        q = numpy_helper.to_array(initializers[node.input[0]])
        for user in consumers.get(node.output[0], []):
            if user.op_type not in _INT8_COMPUTE:
                continue
            data = producers.get(user.input[0])
            if data is None or data.op_type != "DequantizeLinear" or data.input[0] in initializers:
                problems.append(f"{user.op_type} {user.name}: weights are dequantized but its input is "
                                "not, so ONNX Runtime may quantize the activations at run time, per CPU")
                continue
            zero = initializers.get(data.input[2]) if len(data.input) > 2 else None
            if zero is None or numpy_helper.to_array(zero).dtype != np.uint8:
                problems.append(f"{user.op_type} {user.name}: activations are not uint8")
            widest = int(np.abs(q.astype(np.int16)).max())
            if q.dtype == np.int8 and widest > MAX_PORTABLE_WEIGHT:
                problems.append(f"{user.op_type} {user.name}: int8 weights up to {widest} "
                                f"(> {MAX_PORTABLE_WEIGHT}) saturate 16-bit pair sums on AVX2")
    if problems:
        raise NotPortable(f"{path}: " + "; ".join(problems))
