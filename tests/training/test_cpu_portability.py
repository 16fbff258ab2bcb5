"""The shipped models answer the same on every x86-64 CPU.

ONNX Runtime picks its CPU kernels from CPUID when it starts: uint8 × int8 products run in VNNI's
32-bit dot products on one machine and in AVX2's `vpmaddubsw`, which adds pairs of products in
saturating 16-bit lanes, on the next. These tests pin what keeps the shipped graphs out of reach of
that difference, and check it on whatever CPU runs them and on an emulated Haswell (AVX2, no
AVX-512, no VNNI) under Debian's qemu-user, which runs ONNX Runtime's AVX2 kernels on any x86-64
machine.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from training import evaluate
from training.quantize import MAX_PORTABLE_WEIGHT, NotPortable, check_int8_portable

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED = sorted(p.name for p in MODELS.iterdir() if (p / "config.toml").exists())
INT8_IMAGE_MODELS = ["fashion-mnist", "mnist"]
ROOT = Path(__file__).resolve().parents[2]

# How far the served kernels' logits may lie from ONNX Runtime's reference kernels (DISABLE_ALL).
# Float graphs: only the order of float additions differs. Int8 graphs: the fused integer kernels
# requantize each layer's output in one rounding where the reference dequantizes, computes in
# float and quantizes again, so an activation may land one step apart; measured at most 0.033 for
# fashion-mnist and mnist over their test sets, against logit gaps of several units between classes.
TOLERANCE = {"fashion-mnist": 0.1, "mnist": 0.1, "sentiment": 1e-4, "spoken-digits": 1e-3}
SUBSET = 1000  # test rows per model: enough to meet many near-saturating sums, seconds to run


@cache
def rows_of(model: str) -> evaluate.TestSet:
    return evaluate.test_set(model, MODELS).head(SUBSET)


def qemu_haswell(model: Path, inputs: dict[str, np.ndarray], tmp_path: Path) -> np.ndarray:
    """The graph's first output for `inputs`, computed by ONNX Runtime's AVX2 kernels on an emulated
    Haswell CPU (about ten times slower than native)."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.fail("qemu-x86_64 is missing: install Debian's qemu-user (`make system-deps` does)")
    np.savez(tmp_path / "inputs.npz", **inputs)
    subprocess.run([qemu, "-cpu", "Haswell", sys.executable, "-m", "tests.support.run_graph", str(model),
                    str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npy")],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    return np.load(tmp_path / "outputs.npy")


def int8_matmul_graph(path: Path, weight: int, k: int = 64) -> None:
    """y = x · W in QDQ form with every weight equal to `weight`, so x = 255 makes every pair sum of
    an AVX2 kernel 255 · weight · 2."""
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero"], ["x_float"]),
         helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_float"], axis=1),
         helper.make_node("MatMul", ["x_float", "w_float"], ["y"])],
        "int8_matmul", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(np.full((k, 4), weight, np.int8), "w"),
         numpy_helper.from_array(np.ones(4, np.float32), "w_scale"),
         numpy_helper.from_array(np.zeros(4, np.int8), "w_zero"),
         numpy_helper.from_array(np.float32(1.0), "x_scale"),
         numpy_helper.from_array(np.uint8(0), "x_zero")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_emulated_haswell_saturates_wide_int8_weights_and_not_portable_ones(tmp_path):
    """The harness itself: under qemu's Haswell, 8-bit weights overflow the 16-bit pair sums (so the
    tests below would see a graph that does), and weights within ±MAX_PORTABLE_WEIGHT do not."""
    x = {"x": np.full((2, 64), 255, np.uint8)}
    for weight, saturates in ((127, True), (MAX_PORTABLE_WEIGHT + 1, True), (MAX_PORTABLE_WEIGHT, False)):
        path = tmp_path / f"w{weight}.onnx"
        int8_matmul_graph(path, weight)
        exact = 255.0 * weight * 64
        got = qemu_haswell(path, x, tmp_path)
        assert (got != exact).all() if saturates else (got == exact).all(), (weight, got[0, 0], exact)


def test_portability_check_refuses_8_bit_weights_and_runtime_quantized_activations(tmp_path):
    int8_matmul_graph(tmp_path / "wide.onnx", 127)
    with pytest.raises(NotPortable, match="saturate"):
        check_int8_portable(tmp_path / "wide.onnx")
    int8_matmul_graph(tmp_path / "narrow.onnx", MAX_PORTABLE_WEIGHT)
    check_int8_portable(tmp_path / "narrow.onnx")
    # Float activations into a MatMul of dequantized weights: ORT fuses them into MatMulNBits and
    # quantizes the activations at run time, in kernels that differ between CPUs.
    model = onnx.load(str(tmp_path / "narrow.onnx"))
    model.graph.node[0].CopyFrom(helper.make_node("Identity", ["x_in"], ["x_float"]))
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [None, 64]))
    onnx.save(model, str(tmp_path / "weights_only.onnx"))
    with pytest.raises(NotPortable, match="activations at run time"):
        check_int8_portable(tmp_path / "weights_only.onnx")


@pytest.mark.parametrize("model", SHIPPED)
def test_shipped_graph_is_saturation_free(model):
    check_int8_portable(evaluate.served_graph(model, MODELS))


@pytest.mark.parametrize("model", INT8_IMAGE_MODELS)
def test_image_models_compute_in_int8_with_weights_of_at_most_7_bits(model):
    graph = onnx.load(str(evaluate.served_graph(model, MODELS)))
    weights = [numpy_helper.to_array(t) for t in graph.graph.initializer if t.data_type == TensorProto.INT8]
    widest = max(int(np.abs(w.astype(np.int16)).max()) for w in weights if w.size > 1)
    assert sum(w.size for w in weights) > 100_000  # the graph really computes in int8
    assert widest <= MAX_PORTABLE_WEIGHT


@pytest.mark.parametrize("model", SHIPPED)
def test_served_kernels_agree_with_reference_kernels(model):
    """The service's session options (full optimization: fused int8 and float kernels) against
    ONNX Runtime with every optimization off, on the same test rows."""
    path, rows = evaluate.served_graph(model, MODELS), rows_of(model)
    served = evaluate.logits(evaluate.session(path, "all"), rows)
    reference = evaluate.logits(evaluate.session(path, "disable"), rows)
    assert (served.argmax(1) == reference.argmax(1)).all()
    assert np.abs(served - reference).max() <= TOLERANCE[model]


@pytest.mark.parametrize("model", INT8_IMAGE_MODELS)
def test_int8_models_compute_bit_for_bit_the_same_on_an_emulated_haswell(model, tmp_path):
    path, rows = evaluate.served_graph(model, MODELS), rows_of(model)
    native = evaluate.logits(evaluate.session(path, "all"), rows)
    haswell = qemu_haswell(path, rows.inputs, tmp_path)
    np.testing.assert_array_equal(haswell, native)
