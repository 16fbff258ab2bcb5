"""V2 gRPC messages ⇄ the transport-free request and result of `service.server.inference`.

The messages are Triton's own generated classes from `tritonclient[grpc]` (`grpc_service.proto`,
`model_config.proto`): the exact wire contract `tritonclient.grpc` speaks, with no generated code
of ours to keep in step. Tensors go through the same checks as the REST codec (`check_input_head`,
`from_raw`, then `service.server.inference`): raw contents are `np.frombuffer` views of the message's
bytes, BYTES tensors are uint32-length-prefixed elements as in the binary extension.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from service.codecs import v2 as codec
from service.codecs.v2 import InferRequest, RequestedOutput
from service.core.model_config import V2_TO_NUMPY
from service.errors import InvalidInput
from service.server.inference import InferResult

# Which typed `contents` field carries each datatype (Triton's grpc_service.proto).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def parameter(p: pb.InferParameter) -> bool | int | str | float | None:
    """The value of an InferParameter, whichever of its typed fields is set."""
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def decode_infer(request: pb.ModelInferRequest) -> InferRequest:
    """The request's tensors, requested outputs, id and timeout, checked as REST checks them."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
                           "send one per input, in input order")
    if not request.inputs:
        raise InvalidInput("request needs at least one input")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for i, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        codec.check_input_head(name, datatype, shape, inputs)
        if raw:
            inputs[name] = codec.from_raw(name, datatype, shape, memoryview(raw[i]))
        else:
            inputs[name] = _from_contents(name, datatype, shape, tensor.contents)
        datatypes[name] = datatype
    outputs: list[RequestedOutput] | None = None
    for out in request.outputs:
        outputs = outputs or []
        if any(o.name == out.name for o in outputs):
            raise InvalidInput(f"output {out.name!r} is requested twice")
        k = parameter(out.parameters["classification"]) if "classification" in out.parameters else 0
        if type(k) is not int or k < 0:
            raise InvalidInput(f"output {out.name!r}: classification must be a non-negative integer")
        outputs.append(RequestedOutput(out.name, True, k))
    timeout_s = None
    if "timeout" in request.parameters:  # Triton's per-request timeout, in microseconds
        timeout = parameter(request.parameters["timeout"])
        if type(timeout) is not int or timeout < 0:
            raise InvalidInput("parameters.timeout must be a non-negative integer of microseconds")
        timeout_s = timeout / 1e6 if timeout else None
    priority = None
    if "priority" in request.parameters:
        priority = codec.check_priority(parameter(request.parameters["priority"]))
    return InferRequest(request.id or None, inputs, datatypes, outputs, True, timeout_s, priority)


def _from_contents(
    name: str, datatype: str, shape: list[int], contents: pb.InferTensorContents
) -> np.ndarray:
    n = math.prod(shape)
    values = getattr(contents, _CONTENTS_FIELD.get(datatype, ""), None)
    if values is None:
        raise InvalidInput(f"input {name!r}: {datatype} has no typed contents field; use raw_input_contents")
    if len(values) != n:
        raise InvalidInput(f"input {name!r}: shape {shape} holds {n} elements but contents has {len(values)}")
    if datatype == "BYTES":
        arr = np.empty(n, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    try:
        return np.array(values, dtype=V2_TO_NUMPY[datatype]).reshape(shape)
    except OverflowError as e:
        raise InvalidInput(f"input {name!r}: contents are not valid {datatype}: {e}") from None


def encode_infer(result: InferResult, request_id: str | None) -> pb.ModelInferResponse:
    """Every output as raw contents (what Triton's server sends and `InferResult.as_numpy` reads)."""
    response = pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version,
                                      id=request_id or "")
    raw = response.raw_output_contents
    for out, arr in result.outputs:
        datatype = codec.datatype_of(arr)
        response.outputs.add(name=out.name, datatype=datatype, shape=arr.shape)
        raw.append(codec.bytes_to_binary(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes())
    return response


def model_metadata(doc: dict[str, Any]) -> pb.ModelMetadataResponse:
    """`ModelMetadataResponse` from the REST metadata document (its `parameters` have no field)."""
    return pb.ModelMetadataResponse(
        name=doc["name"], versions=doc["versions"], platform=doc["platform"],
        inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in doc["inputs"]],
        outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in doc["outputs"]],
    )


def model_config(doc: dict[str, Any]) -> pb.ModelConfigResponse:
    """`ModelConfigResponse` from Triton's JSON model configuration (the REST `/config` document)."""
    return pb.ModelConfigResponse(config=json_format.ParseDict(doc, mc.ModelConfig(),
                                                               ignore_unknown_fields=True))


def model_statistics(docs: list[dict[str, Any]]) -> pb.ModelStatisticsResponse:
    return json_format.ParseDict({"model_stats": docs}, pb.ModelStatisticsResponse(),
                                 ignore_unknown_fields=True)


def repository_index(entries: list[dict[str, str]]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])
