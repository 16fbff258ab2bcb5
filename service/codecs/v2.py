"""Open Inference Protocol (V2) bodies ⇄ numpy arrays: JSON tensors and the binary tensor extension.

On the hot path on purpose: JSON goes through orjson straight to numpy (no pydantic per tensor),
float tensors in JSON are read by simdjson straight into one buffer (see `_parse_float_tensors`),
binary tensors are `np.frombuffer` views of the request body, and responses are written by orjson,
which serialises numpy arrays natively.

Binary layout (Triton's extension): the body starts with `Inference-Header-Content-Length` bytes of
JSON; then each input with `parameters.binary_data_size` takes its bytes in input order. Numeric
tensors are raw little-endian row-major; BYTES tensors are each element prefixed by its uint32 length.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import simdjson

from service.codecs.text import TextModel
from service.core.model_config import V2_TO_NUMPY, ModelConfig
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia

HEADER_LENGTH = "inference-header-content-length"
_NUMPY_DTYPES = {k: np.dtype(v) for k, v in V2_TO_NUMPY.items()}
_DTYPE_TO_V2 = {np.dtype(v): k for k, v in V2_TO_NUMPY.items()}
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # >0: top-k "score:index:label" strings instead of the tensor


@dataclass(slots=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool
    timeout_s: float | None
    priority: int | None = None  # V2 `parameters.priority` (its class, bounded by the caller's key)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo `Content-Encoding: gzip|deflate` (tritonclient can compress requests), within `limit`."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMedia(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidInput(f"corrupt {encoding} body: {e}") from e
    if len(out) > limit:
        raise PayloadTooLarge(f"decompressed body exceeds {limit} bytes")
    return out


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON header + binary tensors)."""
    view = memoryview(body)
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {n} is outside the body of {len(body)} bytes")
        header_view, binary = view[:n], view[n:]
    else:
        header_view, binary = view, view[:0]
    n_json = len(header_view)
    floats = n_json >= _SIMDJSON_MIN_BYTES and _FLOAT_DATATYPE_PREFIX in body[:n_json]
    doc = (floats and _parse_float_tensors(header_view)) or json_object(header_view)
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request needs a non-empty 'inputs' list")

    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise InvalidInput(f"inputs[{i}] must be an object")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str):
            raise InvalidInput(f"inputs[{i}] needs a string 'name'")
        check_input_head(name, datatype, shape, inputs)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"input {name!r}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input {name!r}: binary_data_size {size!r} exceeds the binary data")
            inputs[name] = from_raw(name, datatype, shape, binary[offset:offset + size])
            offset += size
        elif "data" in item:
            inputs[name] = _from_json(name, datatype, shape, item["data"])
        else:
            raise InvalidInput(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        datatypes[name] = datatype
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data belong to no input")

    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    binary_output = params.get("binary_data_output") is True
    outputs = None
    if doc.get("outputs") is not None:
        outputs = _requested_outputs(doc["outputs"], binary_output)
    timeout_s = None
    timeout = params.get("timeout")  # Triton's per-request timeout, in microseconds
    if timeout is not None:
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
            raise InvalidInput("parameters.timeout must be a non-negative number of microseconds")
        timeout_s = timeout / 1e6 if timeout else None
    priority = check_priority(params.get("priority"))
    rid = doc.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int | float)):
        raise InvalidInput("'id' must be a string")
    rid = None if rid is None else str(rid)
    return InferRequest(rid, inputs, datatypes, outputs, binary_output, timeout_s, priority)


def check_priority(value: object) -> int | None:
    """V2 `parameters.priority` (Triton reads the same parameter): a non-negative integer class;
    here a higher class is served first (Triton's levels count the other way)."""
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise InvalidInput("parameters.priority must be a non-negative integer")
    return value


_FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})
# Below this, simdjson's fixed cost (≈ 10 µs: a parser, proxy objects) exceeds what it saves: at
# 4 KB of JSON floats both paths take ≈ 20 µs; at 15 KB simdjson 30 µs, orjson 55 µs.
_SIMDJSON_MIN_BYTES = 4096
# Only float tensors gain: integers and strings come out of simdjson's proxies slower than out of
# orjson (16 KB of INT64 ids: 129 against 102 µs), so a body without "FP… in it skips the attempt.
_FLOAT_DATATYPE_PREFIX = b'"FP'


def _parse_float_tensors(data: memoryview) -> dict[str, Any] | None:
    """The body as `json_object` reads it, except that each float input's `data` is already a
    float64 array. orjson makes one Python float per element: for 1 s of 16 kHz audio (330 KB of
    JSON) that and the copy to numpy take ≈ 0.6 ms, simdjson's parse and `as_buffer` ≈ 0.3 ms (`bench
    breakdown`). Returns None for anything but a well-formed request (invalid JSON, repeated keys,
    non-numbers in a float tensor...), so that the general path and its error messages take over."""
    try:
        doc = simdjson.Parser().parse(data)
        if not isinstance(doc, simdjson.Object) or not _unique_keys(doc):
            return None
        out = {key: _plain(doc[key]) for key in doc if key != "inputs"}
        raw_inputs = doc.get("inputs")
        if not isinstance(raw_inputs, simdjson.Array):
            return None
        inputs = []
        for item in raw_inputs:
            if not isinstance(item, simdjson.Object) or not _unique_keys(item):
                return None
            plain = {key: _plain(item[key]) for key in item if key != "data"}
            if "data" in item:
                data_value = item["data"]
                if plain.get("datatype") in _FLOAT_DATATYPES and isinstance(data_value, simdjson.Array):
                    plain["data"] = np.frombuffer(data_value.as_buffer(of_type="d"), dtype=np.float64)
                else:
                    plain["data"] = _plain(data_value)
            inputs.append(plain)
        out["inputs"] = inputs
        return out
    except (ValueError, TypeError, RuntimeError):  # simdjson's parse and type errors
        return None


def _unique_keys(obj: simdjson.Object) -> bool:
    keys = list(obj)
    return len(set(keys)) == len(keys)


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _requested_outputs(raw: Any, binary_default: bool) -> list[RequestedOutput] | None:
    if not isinstance(raw, list):
        raise InvalidInput("'outputs' must be a list")
    if not raw:
        return None  # asks for no output in particular: every output, as when 'outputs' is absent
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{i}] needs a string 'name'")
        if any(o.name == item["name"] for o in out):
            raise InvalidInput(f"output {item['name']!r} is requested twice")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"outputs[{i}].parameters must be an object")
        binary = params.get("binary_data", binary_default)
        k = params.get("classification", 0)
        if type(k) is not int or k < 0:
            raise InvalidInput(f"output {item['name']!r}: classification must be a non-negative integer")
        out.append(RequestedOutput(item["name"], binary is True, k))
    return out


# numpy's limits on any array, even an empty one: a zero dimension next to a huge one passes the
# element count check (0 elements) but not `reshape`.
_MAX_DIMS = 32
_MAX_DIM_PRODUCT = 2**40


def check_input_head(name: str, datatype: Any, shape: Any, seen: dict[str, np.ndarray]) -> None:
    """The checks every input's name, datatype and shape pass before its data is read, whichever
    transport carried it (`seen`: the inputs read so far)."""
    if name in seen:
        raise InvalidInput(f"input {name!r} appears twice")
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in _NUMPY_DTYPES):
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    _check_shape_size(name, shape)


def _check_shape_size(name: str, shape: list[int]) -> None:
    if len(shape) > _MAX_DIMS:
        raise InvalidInput(f"input {name!r}: shape has {len(shape)} dimensions; at most {_MAX_DIMS}")
    if math.prod(d or 1 for d in shape) > _MAX_DIM_PRODUCT:
        raise InvalidInput(f"input {name!r}: shape {shape} is too large (non-zero dimensions multiply "
                           f"to more than 2**40)")


def _from_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    n = math.prod(shape)
    if datatype == "BYTES":
        flat = list(_flatten(data))
        if not all(isinstance(s, str) for s in flat):
            raise InvalidInput(f"input {name!r}: BYTES data must be strings")
        arr = np.empty(len(flat), dtype=object)
        arr[:] = [s.encode() for s in flat]
    else:
        arr = None
        if datatype == "UINT8" and type(data) is list:
            # Pixels: bytes() converts a flat list of 0..255 ints about 3x faster than np.array and
            # refuses anything else (nested lists, floats, out of range), which then takes the slow path.
            try:
                arr = np.frombuffer(bytes(data), dtype=np.uint8)
            except (TypeError, ValueError):
                arr = None
        if arr is None:
            try:
                arr = np.array(data, dtype=_NUMPY_DTYPES[datatype])
            except (TypeError, ValueError, OverflowError) as e:
                raise InvalidInput(f"input {name!r}: data is not valid {datatype}: {e}") from None
            # JSON has no NaN: one here was a null (the arrays simdjson fills can hold none)
            if datatype in _FLOAT_DATATYPES and not isinstance(data, np.ndarray) and np.isnan(arr).any():
                raise InvalidInput(f"input {name!r}: data is not valid {datatype}: null is not a number")
    if arr.size != n:
        raise InvalidInput(f"input {name!r}: shape {shape} holds {n} elements but data has {arr.size}")
    return arr.reshape(shape)


def _flatten(data: Any):
    if isinstance(data, list):
        for x in data:
            yield from _flatten(x)
    else:
        yield data


def from_raw(name: str, datatype: str, shape: list[int], buf: memoryview) -> np.ndarray:
    """One tensor from its raw bytes (binary extension, gRPC `raw_input_contents`): a view, no copy
    unless misaligned."""
    n = math.prod(shape)
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(buf):
            if pos + 4 > len(buf):
                raise InvalidInput(f"input {name!r}: truncated BYTES element length")
            (length,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if pos + length > len(buf):
                raise InvalidInput(f"input {name!r}: truncated BYTES element")
            items.append(bytes(buf[pos:pos + length]))
            pos += length
        if len(items) != n:
            raise InvalidInput(f"input {name!r}: shape {shape} holds {n} elements but data has {len(items)}")
        return np.array(items, dtype=object).reshape(shape)
    dtype = _NUMPY_DTYPES[datatype]
    if len(buf) != n * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r}: shape {shape} of {datatype} needs {n * dtype.itemsize} bytes, got {len(buf)}"
        )
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    if not arr.flags.aligned:  # the JSON header's length decides the offset; ORT wants aligned data
        arr = arr.copy()
    return arr


# -- model-aware checks -----------------------------------------------------------------------------


def to_feeds(
    req: InferRequest, config: ModelConfig, text: TextModel | None
) -> tuple[dict[str, np.ndarray], int]:
    """Check the request's tensors against the model and return the feeds and their row count."""
    if text is not None and len(req.inputs) == 1 and next(iter(req.datatypes.values())) == "BYTES":
        return _tokenize(next(iter(req.inputs.items())), config, text)
    specs = {s.name: s for s in config.inputs}
    missing = [n for n in specs if n not in req.inputs]
    if missing:
        raise InvalidInput(f"missing input(s) {missing}; model {config.name!r} takes {list(specs)}")
    extra = [n for n in req.inputs if n not in specs]
    if extra:
        raise InvalidInput(f"unexpected input(s) {extra}; model {config.name!r} takes {list(specs)}")
    rows = None
    for name, arr in req.inputs.items():
        spec = specs[name]
        if req.datatypes[name] != spec.datatype:
            raise InvalidInput(
                f"input {name!r}: datatype {req.datatypes[name]}, the model takes {spec.datatype}"
            )
        if arr.ndim != len(spec.shape):
            raise InvalidInput(f"input {name!r}: shape {list(arr.shape)}, the model takes {spec.shape}")
        for axis, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
            if got == 0 or (want != -1 and got != want):
                raise InvalidInput(f"input {name!r}: shape {list(arr.shape)}, the model takes {spec.shape} "
                                   f"(axis {axis})")
        if rows is None:
            rows = arr.shape[0]
        elif arr.shape[0] != rows:
            raise InvalidInput("all inputs must have the same batch size (first axis)")
    assert rows is not None
    max_rows = config.batching.max_batch_size
    if rows > max_rows:
        raise InvalidInput(f"batch of {rows} rows exceeds max_batch_size {max_rows}; split the request")
    if text is not None:
        _check_tokens(req.inputs, config, text)
    return req.inputs, rows


def _check_tokens(inputs: dict[str, np.ndarray], config: ModelConfig, text: TextModel) -> None:
    shapes = {a.shape for a in inputs.values()}
    if len(shapes) != 1:
        raise InvalidInput("token ids, attention mask (and token types) must all have the same shape")
    length = next(iter(shapes))[1]
    if config.text is not None and length > config.text.max_tokens:
        raise InvalidInput(f"{length} tokens per row; the model takes at most {config.text.max_tokens}")
    ids = inputs[text.ids]
    vocab = text.vocab_size
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InvalidInput(f"input {text.ids!r}: token ids must lie in [0, {vocab})")


def _tokenize(
    item: tuple[str, np.ndarray], config: ModelConfig, text: TextModel
) -> tuple[dict[str, np.ndarray], int]:
    name, arr = item
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or not len(arr):
        raise InvalidInput(f"BYTES input {name!r} must be shaped [n] or [n, 1] (one string per row)")
    if len(arr) > config.batching.max_batch_size:
        raise InvalidInput(f"{len(arr)} texts exceed max_batch_size {config.batching.max_batch_size}")
    try:
        texts = [b.decode("utf-8") for b in arr]
    except UnicodeDecodeError as e:
        raise InvalidInput(f"BYTES input {name!r} is not UTF-8 text") from e
    return text.feeds(text.encode(texts)), len(texts)


# -- responses --------------------------------------------------------------------------------------


def select_outputs(
    req: InferRequest, outputs: dict[str, np.ndarray], labels: Sequence[str]
) -> list[tuple[RequestedOutput, np.ndarray]]:
    """The outputs the request asked for (all, in model order, when it named none), in its order,
    with the classification extension applied: what every transport then writes in its own form."""
    wanted = req.outputs
    if wanted is None:
        wanted = [RequestedOutput(name, req.binary_output) for name in outputs]
    return [(out, classify(outputs[out.name], out.classification, labels) if out.classification
             else outputs[out.name]) for out in wanted]


def datatype_of(arr: np.ndarray) -> str:
    """The V2 datatype of an output array (object arrays hold BYTES)."""
    return "BYTES" if arr.dtype == object else _DTYPE_TO_V2[arr.dtype]


def encode_response(
    model_name: str,
    version: str,
    req: InferRequest,
    selected: list[tuple[RequestedOutput, np.ndarray]],
) -> tuple[bytes, int | None]:
    """The response body for `select_outputs`' result, and the JSON header's length when binary
    tensors follow it."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out, arr in selected:
        datatype = datatype_of(arr)
        entry: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": list(arr.shape)}
        if out.binary:
            raw = bytes_to_binary(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [b.decode("utf-8", "replace") for b in arr.reshape(-1)]
        else:
            entry["data"] = np.ascontiguousarray(arr).reshape(-1)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": entries}
    if req.id is not None:
        doc["id"] = req.id
    header = orjson.dumps(doc, option=_JSON_OPTS)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def check_outputs(req: InferRequest, config: ModelConfig) -> None:
    """Reject unknown output names and classification of non-matrix outputs before any compute."""
    if req.outputs is None:
        return
    specs = {o.name: o for o in config.outputs}
    for out in req.outputs:
        spec = specs.get(out.name)
        if spec is None:
            raise InvalidInput(f"unknown output {out.name!r}; model {config.name!r} has {list(specs)}")
        if out.classification and len(spec.shape) != 2:
            raise InvalidInput(
                f"classification needs a [batch, classes] output; {out.name!r} is {spec.shape}"
            )


def classify(scores: np.ndarray, k: int, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification extension: per row the top-k as b"score:index:label" strings."""
    k = min(k, scores.shape[-1])
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    named = len(labels) == scores.shape[-1]
    out = np.empty(top.shape, dtype=object)
    for row in range(top.shape[0]):
        for j, idx in enumerate(top[row].tolist()):
            s = f"{float(scores[row, idx]):f}:{idx}"
            out[row, j] = (f"{s}:{labels[idx]}" if named else s).encode()
    return out


def bytes_to_binary(arr: np.ndarray) -> bytes:
    """BYTES elements as the binary extension (and gRPC's raw contents) carry them: each
    prefixed by its uint32 little-endian length."""
    parts = []
    for b in arr.reshape(-1):
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def json_object(data: bytes | memoryview, *, what: str = "request body") -> dict[str, Any]:
    """Parse `data` as a JSON object, or raise InvalidInput naming `what` was wrong."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return doc
