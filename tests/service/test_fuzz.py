"""Property tests at a real server: whatever a V2 infer request or an upload holds, the answer is a
200 or a 4xx JSON error, never a 500, and the server keeps serving.

Each test starts from a valid request for one of the served models and breaks it the way clients
and networks do: any JSON value in any field, any shape, any framing of the binary extension, any
corruption of an image or audio file. Examples are derandomized, so a run is reproducible and CI
never meets a new example by chance.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.core.model_config import V2_TO_NUMPY
from tests.service import media
from tests.service.conftest import Server, TestModels

FUZZ = settings(max_examples=250, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6))
# Any JSON value, nested a little: what ends up in a field when a client gets it wrong.
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
_DIMS = st.sampled_from([0, 1, 2, 3, 2**31, 2**63 - 1]) | st.integers(min_value=0, max_value=2**63 - 1)
# Bytes per element of each numeric V2 datatype, from the service's own table.
_ITEMSIZE = {v2: np.dtype(np_type).itemsize for v2, np_type in V2_TO_NUMPY.items()}


@pytest.fixture(scope="module")
def client(server: Server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def valid(client: httpx.Client, test_models: TestModels) -> dict[str, dict[str, Any]]:
    """A valid V2 JSON request per served model, built from its metadata."""
    out = {}
    for model in (test_models.image, test_models.text, test_models.audio):
        meta = client.get(f"/v2/models/{model}").raise_for_status().json()
        inputs = []
        for t in meta["inputs"]:
            if t["datatype"] == "BYTES":
                continue  # the text model's optional raw-text input; the token inputs suffice
            shape = [1 if i == 0 else (4 if d == -1 else d) for i, d in enumerate(t["shape"])]
            zero = 0.0 if t["datatype"].startswith("FP") else 0
            inputs.append({"name": t["name"], "datatype": t["datatype"], "shape": shape,
                           "data": [zero] * math.prod(shape)})
        out[model] = {"inputs": inputs}
    return out


def _post(client: httpx.Client, model: str, body: bytes, header_length: int | str | None = None) -> None:
    headers = {"Content-Type": "application/json"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    _assert_answered(client.post(f"/v2/models/{model}/infer", content=body, headers=headers), body)


def _assert_answered(r: httpx.Response, body: bytes) -> None:
    if r.status_code == 200:
        return
    assert 400 <= r.status_code < 500, f"{r.status_code} {r.text} for {body[:500]!r}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert set(r.json()) == {"error", "code"}, r.text


def _still_serves(client: httpx.Client, valid: dict[str, dict[str, Any]]) -> None:
    for model, doc in valid.items():
        r = client.post(f"/v2/models/{model}/infer", content=json.dumps(doc))
        assert r.status_code == 200, r.text


# Where a mutation lands: (part of the request, key). "input" is one of the request's inputs.
_FIELDS = st.sampled_from([
    ("request", "inputs"), ("request", "outputs"), ("request", "parameters"), ("request", "id"),
    ("input", "name"), ("input", "datatype"), ("input", "shape"), ("input", "data"),
    ("input", "parameters"), ("input_parameters", "binary_data_size"),
    ("request_parameters", "timeout"), ("request_parameters", "binary_data_output"),
    ("output", "name"), ("output", "parameters"), ("output_parameters", "classification"),
    ("output_parameters", "binary_data"),
])


def _mutate(doc: dict[str, Any], where: str, key: str, value: Any, delete: bool) -> None:
    """Set (or delete) `key` of the part of `doc` named by `where`, unless an earlier mutation has
    already replaced that part with something that is not an object."""
    if where.startswith("output") and "outputs" not in doc:
        doc["outputs"] = [{"name": "probabilities", "parameters": {}}]
    part: Any = doc
    path = {"request": [], "request_parameters": ["parameters"], "input": ["inputs", 0],
            "input_parameters": ["inputs", 0, "parameters"], "output": ["outputs", 0],
            "output_parameters": ["outputs", 0, "parameters"]}[where]
    for step in path:
        if isinstance(step, str) and isinstance(part, dict):
            part = part.setdefault(step, {})
        elif isinstance(step, int) and isinstance(part, list) and part:
            part = part[step]
        else:
            return
    if not isinstance(part, dict):
        return
    if delete:
        part.pop(key, None)
    else:
        part[key] = value


def test_any_json_value_in_any_field_gets_200_or_a_json_4xx(client: httpx.Client, valid: dict):
    @FUZZ
    @given(model=st.sampled_from(sorted(valid)),
           mutations=st.lists(st.tuples(_FIELDS, _JSON, st.booleans()), min_size=1, max_size=3))
    def check(model: str, mutations: list) -> None:
        doc = json.loads(json.dumps(valid[model]))
        for (where, key), value, delete in mutations:
            _mutate(doc, where, key, value, delete)
        _post(client, model, json.dumps(doc).encode())

    check()
    _still_serves(client, valid)


def test_any_shape_gets_200_or_a_json_4xx(client: httpx.Client, valid: dict):
    @FUZZ
    @given(model=st.sampled_from(sorted(valid)), shape=st.lists(_DIMS, max_size=70),
           binary=st.booleans(), fill=st.integers(min_value=0, max_value=64))
    def check(model: str, shape: list[int], binary: bool, fill: int) -> None:
        doc = json.loads(json.dumps(valid[model]))
        inp = doc["inputs"][0]
        inp["shape"] = shape
        # As many elements as the shape holds when that is small (else a few: the sizes disagree).
        n = math.prod(shape)
        n = n if n <= 64 else fill
        if not binary:
            inp["data"] = inp["data"][:1] * n
            _post(client, model, json.dumps(doc).encode())
            return
        del inp["data"]
        blob = b"\0" * (n * _ITEMSIZE[inp["datatype"]])
        inp["parameters"] = {"binary_data_size": len(blob)}
        header = json.dumps(doc).encode()
        _post(client, model, header + blob, len(header))

    check()
    _still_serves(client, valid)


def test_any_binary_framing_gets_200_or_a_json_4xx(client: httpx.Client, valid: dict):
    @FUZZ
    @given(model=st.sampled_from(sorted(valid)), data=st.data())
    def check(model: str, data: st.DataObject) -> None:
        doc = json.loads(json.dumps(valid[model]))
        blobs = b""
        for inp in doc["inputs"]:
            real = len(inp.pop("data")) * _ITEMSIZE[inp["datatype"]]
            sent = data.draw(st.sampled_from([real, 0, real - 1, real + 1]) | st.integers(0, 2 * real + 8))
            declared = data.draw(st.sampled_from([sent, real]) | _JSON)
            inp["parameters"] = {"binary_data_size": declared}
            pattern = data.draw(st.binary(min_size=1, max_size=8))
            blobs += (pattern * (sent // len(pattern) + 1))[:sent]
        header = json.dumps(doc).encode()
        length = data.draw(st.sampled_from([len(header)]) | st.integers(-2, len(header) + len(blobs) + 2)
                           | st.sampled_from(["", "x", "1e3", "+5", "0x10"]))
        _post(client, model, header + blobs, length)

    check()
    _still_serves(client, valid)


_UPLOADS = {
    "image": [("image/png", media.png(32, 24)), ("image/jpeg", media.encoded("JPEG")),
              ("image/gif", media.encoded("GIF")), ("image/bmp", media.encoded("BMP")),
              ("image/webp", media.encoded("WEBP"))],
    "audio": [("audio/wav", media.wav(0.3, 16000, 1, subtype="PCM_16")),
              ("audio/wav", media.wav(0.2, 44100, 2, subtype="FLOAT")),
              ("audio/flac", media.wav(0.3, 22050, 1, fmt="FLAC")),
              ("audio/ogg", media.wav(0.3, 16000, 1, fmt="OGG"))],
}
# One edit of a file: at a fraction of its length, overwrite, cut the rest, or insert bytes.
_EDITS = st.tuples(st.floats(min_value=0, max_value=1), st.sampled_from(["overwrite", "truncate", "insert"]),
                   st.binary(min_size=1, max_size=8) | st.sampled_from([b"\xff\xff\xff\xff", b"\0\0\0\0"]))


def _corrupt(data: bytes, edits: list[tuple[float, str, bytes]]) -> bytes:
    out = bytearray(data)
    for where, op, patch in edits:
        i = int(where * len(out))
        if op == "overwrite":
            out[i:i + len(patch)] = patch
        elif op == "truncate":
            del out[i:]
        else:
            out[i:i] = patch
    return bytes(out)


def test_any_corruption_of_an_upload_gets_200_or_a_json_4xx(client: httpx.Client, test_models: TestModels,
                                                             valid: dict):
    models = {"image": test_models.image, "audio": test_models.audio}

    @FUZZ
    @given(task=st.sampled_from(sorted(_UPLOADS)), data=st.data(), edits=st.lists(_EDITS, max_size=4))
    def check(task: str, data: st.DataObject, edits: list) -> None:
        content_type, file = data.draw(st.sampled_from(_UPLOADS[task]))
        body = _corrupt(file, edits)
        r = client.post(f"/v1/{task}/{models[task]}", content=body, headers={"Content-Type": content_type})
        _assert_answered(r, body)

    check()
    _still_serves(client, valid)
