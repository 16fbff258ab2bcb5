"""Line timing of the pieces of a request path, in process, for one model's sample (µs per call).

Says what a V2 JSON request costs before and after ONNX Runtime: parsing the body (stdlib json,
orjson, pydantic), turning the list into an array, the binary alternative, and encoding the reply.
"""

from __future__ import annotations

import json
import timeit
from pathlib import Path

import numpy as np
import orjson
import simdjson
from fastapi.encoders import jsonable_encoder

from bench import raw_ort
from bench.reference_server import InferRequest
from bench.workloads import V2_TO_NUMPY, load_workload, model_file, v2_binary, v2_json
from service.codecs import v2


def _us(fn, number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number * 1e6


def run(model_dir: Path, threads: int = 1, number: int = 300) -> list[tuple[str, float]]:
    w = load_workload(model_dir)
    sample = w.samples[0]
    body = v2_json(w, sample).body
    spec = w.inputs[0]
    dtype = V2_TO_NUMPY[spec.datatype]
    parsed = orjson.loads(body)
    data = parsed["inputs"][0]["data"]
    shape = parsed["inputs"][0]["shape"]
    binary = v2_binary(w, sample)
    head_len = int(binary.headers["Inference-Header-Content-Length"])
    sess = raw_ort.session(model_file(model_dir), threads)
    feed = {s.name: sample[s.name] for s in w.inputs}
    outs = sess.run(None, feed)
    reply = {"outputs": [{"name": f"o{i}", "shape": list(a.shape), "datatype": "FP32",
                          "data": a.ravel().tolist()} for i, a in enumerate(outs)]}
    rows = [
        (f"request body size, V2 JSON: {len(body)} bytes; binary: {len(binary.body)} bytes", float("nan")),
        ("json.loads(body) (stdlib)", _us(lambda: json.loads(body), number)),
        ("orjson.loads(body)", _us(lambda: orjson.loads(body), number)),
        ("pydantic InferRequest.model_validate_json(body) (data: list[float])",
         _us(lambda: InferRequest.model_validate_json(body), number)),
        ("np.asarray(list, dtype).reshape(shape)",
         _us(lambda: np.asarray(data, dtype=dtype).reshape(shape), number)),
        ("np.fromiter(list) / np.array(list) then astype",
         _us(lambda: np.array(data).astype(dtype).reshape(shape), number)),
        ("service: v2.decode_request(body) (simdjson for float tensors, else orjson)",
         _us(lambda: v2.decode_request(body, None), number)),
        ("simdjson.Parser().parse(body) alone (the text-reading part of the above)",
         _us(lambda: simdjson.Parser().parse(body), number)),
        ("binary: orjson.loads(header) + np.frombuffer(rest)",
         _us(lambda: (orjson.loads(binary.body[:head_len]),
                      np.frombuffer(binary.body[head_len:], dtype=dtype).reshape(shape)), number)),
        (f"session.run, batch 1, {threads} thread(s)", _us(lambda: sess.run(None, feed), number)),
        ("reply: arr.ravel().tolist() for every output",
         _us(lambda: [a.ravel().tolist() for a in outs], number)),
        ("reply: fastapi.encoders.jsonable_encoder(reply dict) (FastAPI default)",
         _us(lambda: jsonable_encoder(reply), number)),
        ("reply: orjson.dumps(reply dict)", _us(lambda: orjson.dumps(reply), number)),
        ("reply: json.dumps(reply dict) (stdlib, as FastAPI's JSONResponse)",
         _us(lambda: json.dumps(reply), number)),
    ]
    return rows
