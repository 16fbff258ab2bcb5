"""V2 JSON bodies: float tensors read by simdjson straight into a buffer decode to exactly what the
general orjson path gives, and every body the fast path does not take (repeated keys, non-numbers,
invalid JSON) still gets the general path's answer or error."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from service.codecs import v2
from service.errors import InvalidInput


@pytest.fixture(autouse=True)
def fast_path_for_every_size(monkeypatch):
    """Small bodies skip the fast path (its fixed cost): here every body may take it."""
    monkeypatch.setattr(v2, "_SIMDJSON_MIN_BYTES", 0)


def general_path(body: bytes) -> v2.InferRequest:
    """decode_request as it reads a body when the float fast path declines it."""
    original = v2._parse_float_tensors
    v2._parse_float_tensors = lambda data: None
    try:
        return v2.decode_request(body, None)
    finally:
        v2._parse_float_tensors = original


def body(datatype: str, shape: list[int], data, **extra) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}],
                         **extra})


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@pytest.mark.parametrize("nested", [False, True])
def test_float_tensors_decode_exactly_as_the_general_path(datatype: str, nested: bool):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 4000), [0.0, -0.0, 1e-30, 3.4e38, 65504.0, -7, 12]])
    values = values[: 4000].reshape(4, 1000) if nested else values[: 4000]
    data = values.tolist()
    row = data[1] if nested else data
    row[:3] = [1, -2, 3]  # integers mixed in
    raw = body(datatype, [4, 1000], data, id="r1", parameters={"timeout": 2500})
    assert v2._parse_float_tensors(memoryview(raw)) is not None  # the fast path took it
    fast, general = v2.decode_request(raw, None), general_path(raw)
    assert fast.inputs["x"].dtype == general.inputs["x"].dtype == np.dtype(v2.V2_TO_NUMPY[datatype])
    np.testing.assert_array_equal(fast.inputs["x"], general.inputs["x"])
    assert (fast.id, fast.timeout_s, fast.datatypes) == (general.id, general.timeout_s, general.datatypes)


def test_other_inputs_and_fields_come_through_the_fast_path_unchanged():
    raw = orjson.dumps({
        "id": 7,
        "inputs": [
            {"name": "wave", "datatype": "FP32", "shape": [1, 3], "data": [0.5, -0.25, 1]},
            {"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": [[101, 102]]},
            {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["héllo"]},
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
        "parameters": {"binary_data_output": True},
    })
    fast, general = v2.decode_request(raw, None), general_path(raw)
    for name in ("wave", "ids", "text"):
        np.testing.assert_array_equal(fast.inputs[name], general.inputs[name])
        assert fast.inputs[name].dtype == general.inputs[name].dtype
    assert fast.id == "7" and fast.outputs == general.outputs and fast.binary_output is True


@pytest.mark.parametrize("raw", [
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, "a"]}]}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, null]}]}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]]}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 1e999]}]}',
    b'[{"name": "x"}]',
])
def test_bad_bodies_get_the_general_paths_error(raw: bytes):
    """(A null would become NaN in numpy; JSON has no NaN, so the codec refuses it.)"""
    with pytest.raises(InvalidInput) as fast:
        v2.decode_request(raw, None)
    with pytest.raises(InvalidInput) as general:
        general_path(raw)
    assert str(fast.value) == str(general.value)


def test_repeated_keys_mean_what_they_mean_to_orjson_the_last_one_wins():
    raw = (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],'
           b' "inputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [2, 3], "data": [4, 5]}]}')
    assert v2._parse_float_tensors(memoryview(raw)) is None
    req = v2.decode_request(raw, None)
    assert list(req.inputs) == ["y"]
    np.testing.assert_array_equal(req.inputs["y"], np.array([4, 5], dtype=np.float32))


def test_an_empty_outputs_list_asks_for_every_output_like_no_list():
    base = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    assert v2.decode_request(orjson.dumps({**base, "outputs": []}), None).outputs is None
    assert v2.decode_request(orjson.dumps(base), None).outputs is None
