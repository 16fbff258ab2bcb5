"""Open Inference Protocol (V2) REST routes, with Triton's extensions: binary tensor data,
classification, statistics, model configuration and model repository."""

from __future__ import annotations

from time import perf_counter
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import __version__
from service.codecs import v2 as codec
from service.core.catalog import Catalog, Model, ModelVersion, State
from service.core.model_config import CUDA
from service.errors import InvalidInput, ModelLoadFailed, ModelNotFound, ModelNotReady, Unsupported
from service.server import inference
from service.server.rest import admission
from service.server.rest.common import admit, deadline, refuse_early, state_of
from service.server.rest.routing import direct
from service.server.rest.schemas import (
    BYTES_EXAMPLE,
    IMAGE_EXAMPLE,
    RESPONSE_EXAMPLE,
    TEXT_EXAMPLE,
    ErrorBody,
    RepositoryIndexEntry,
    V2ModelMetadata,
    V2ServerMetadata,
)
from service.server.state import ServiceState

router = APIRouter(tags=["v2"])

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository",
              "parameters", "statistics"]
PLATFORM = "onnxruntime_onnx"


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody} for s in statuses}


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


@router.get("/v2", summary="Server metadata", response_model=V2ServerMetadata)
async def servermetadata_doc() -> Response:
    return _json({"name": "neuroserve", "version": __version__, "extensions": EXTENSIONS})


# -- statistics (registered before /v2/models/{model} so "stats" is not taken for a model name) ----


@router.get("/v2/models/stats", summary="Statistics of every model")
async def all_stats(request: Request) -> Response:
    return _json({"model_stats": await state_of(request).executor.statistics(None, None)})


@router.get("/v2/models/{model}/stats", summary="Model statistics", responses=_errors(404))
async def model_stats(request: Request, model: str) -> Response:
    return await _stats(request, model, None)


@router.get("/v2/models/{model}/versions/{version}/stats", summary="Model version statistics",
            responses=_errors(404))
async def model_version_stats(request: Request, model: str, version: str) -> Response:
    return await _stats(request, model, version)


async def _stats(request: Request, model: str, version: str | None) -> Response:
    """Triton's statistics, kept by the executor: the same from every worker."""
    return _json({"model_stats": await state_of(request).executor.statistics(model, version)})


# -- metadata, readiness, configuration -------------------------------------------------------------


def _no_version(model: str, version: str) -> Exception:
    return ModelNotFound(f"model {model!r} has no version {version!r}")


def _model_and_versions(
    request: Request, model: str, version: str | None
) -> tuple[Model, list[ModelVersion]]:
    return model_and_versions(state_of(request).repository, model, version)


def model_and_versions(repo: Catalog, model: str, version: str | None) -> tuple[Model, list[ModelVersion]]:
    """The model and its ready versions (or the one asked for), for metadata and configuration."""
    m = repo.model(model)
    if m.config is None:
        raise ModelNotReady(f"model {model!r} is unavailable: {m.error}")
    if version is None:
        return m, m.ready_versions()
    mv = next((mv for v, mv in m.versions.items() if str(v) == version), None)
    if mv is None:
        raise _no_version(model, version)
    return m, [mv]


def metadata_doc(m: Model, versions: list[ModelVersion]) -> dict[str, Any]:
    config = m.config
    assert config is not None
    provider = versions[-1].provider if versions else ""
    return {
        "name": m.name,
        "versions": [str(mv.version) for mv in versions],
        "platform": PLATFORM,
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in config.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in config.outputs],
        "parameters": {"task": config.task, "provider": provider, "labels": len(m.labels),
                       "scores_output": config.scores_output, "description": config.description},
    }


@router.get("/v2/models/{model}", summary="Model metadata", response_model=V2ModelMetadata,
            responses=_errors(404, 503))
async def modelmetadata_doc(request: Request, model: str) -> Response:
    return _json(metadata_doc(*_model_and_versions(request, model, None)))


@router.get("/v2/models/{model}/versions/{version}", summary="Model version metadata",
            response_model=V2ModelMetadata, responses=_errors(404, 503))
async def model_versionmetadata_doc(request: Request, model: str, version: str) -> Response:
    return _json(metadata_doc(*_model_and_versions(request, model, version)))


@router.get("/v2/models/{model}/ready", summary="Model ready",
            responses={200: {"description": "A version is READY"}, **_errors(404, 503)})
async def model_ready(request: Request, model: str) -> Response:
    state_of(request).repository.get(model, None)
    return Response(status_code=200)


@router.get("/v2/models/{model}/versions/{version}/ready", summary="Model version ready",
            responses={200: {"description": "The version is READY"}, **_errors(404, 503)})
async def model_version_ready(request: Request, model: str, version: str) -> Response:
    state_of(request).repository.get(model, version)
    return Response(status_code=200)


def _triton_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def triton_config_doc(m: Model, versions: list[ModelVersion], device_id: int) -> dict[str, Any]:
    """Triton's JSON model configuration, enough for perf_analyzer and tritonclient."""
    config = m.config
    assert config is not None
    provider = versions[-1].provider if versions else ""
    b = (versions[-1].config if versions else config).batching  # the knobs in force on its provider
    policy = config.version_policy
    version_policy = ({"specific": {"versions": policy.specific}} if policy.specific is not None
                      else {"latest": {"num_versions": policy.latest or 1}})
    gpu = provider == CUDA
    return {
        "name": m.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": version_policy,
        "max_batch_size": b.max_batch_size,
        "input": [{"name": t.name, "data_type": _triton_type(t.datatype), "format": "FORMAT_NONE",
                   "dims": t.shape[1:], "is_shape_tensor": False, "allow_ragged_batch": False,
                   "optional": False} for t in config.inputs],
        "output": [{"name": t.name, "data_type": _triton_type(t.datatype), "dims": t.shape[1:],
                    "label_filename": "", "is_shape_tensor": False} for t in config.outputs],
        "batch_input": [],
        "batch_output": [],
        "dynamic_batching": {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": int(b.max_queue_delay_ms * 1000),
            "preserve_ordering": False,
            "default_queue_policy": {"timeout_action": "REJECT", "default_timeout_microseconds": 0,
                                     "allow_timeout_override": True, "max_queue_size": b.max_queue_size},
        },
        "instance_group": [{"name": f"{m.name}_0", "kind": "KIND_GPU" if gpu else "KIND_CPU",
                            "count": b.instances, "gpus": [device_id] if gpu else [], "host_policy": ""}],
        "default_model_filename": "model.onnx",
        "parameters": {},
    }


@router.get("/v2/models/{model}/config", summary="Model configuration (Triton JSON form)",
            responses=_errors(404, 503))
async def model_config(request: Request, model: str) -> Response:
    device = state_of(request).settings.cuda_device_id
    return _json(triton_config_doc(*_model_and_versions(request, model, None), device))


@router.get("/v2/models/{model}/versions/{version}/config", summary="Model version configuration",
            responses=_errors(404, 503))
async def model_version_config(request: Request, model: str, version: str) -> Response:
    device = state_of(request).settings.cuda_device_id
    return _json(triton_config_doc(*_model_and_versions(request, model, version), device))


# -- inference ---------------------------------------------------------------------------------------

_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "JSON tensors; or, with the `Inference-Header-Content-Length` header, that many "
                       "bytes of JSON followed by the binary tensors (`parameters.binary_data_size`).",
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/V2InferRequest"},
                "examples": {
                    "image": {"summary": "Image pixels, top-3 classification", "value": IMAGE_EXAMPLE},
                    "text": {"summary": "Token ids and attention mask", "value": TEXT_EXAMPLE},
                    "bytes": {"summary": "Raw text (tokenized by the model's tokenizer)",
                              "value": BYTES_EXAMPLE},
                },
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
         "schema": {"type": "integer"}, "description": "Length of the JSON header before binary tensors"},
        {"name": "X-Request-Timeout-Ms", "in": "header", "required": False, "schema": {"type": "number"},
         "description": "Deadline: a request still queued after this long is answered 504"},
        {"name": "X-Request-ID", "in": "header", "required": False, "schema": {"type": "string"},
         "description": "Echoed in the response and the logs"},
    ],
    "responses": {
        "200": {
            "description": "Outputs; `application/octet-stream` with `Inference-Header-Content-Length` "
                           "when binary outputs were asked for",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/V2InferResponse"},
                                     "example": RESPONSE_EXAMPLE},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
    },
}
_INFER_ERRORS = _errors(400, 404, 413, 429, 503, 504)


@router.post("/v2/models/{model}/infer", summary="Infer (latest ready version)", openapi_extra=_INFER_DOC,
             responses=_INFER_ERRORS, response_class=Response)
@direct()
async def infer(request: Request, model: str) -> Response:
    return await infer_request(request, model, None)


@router.post("/v2/models/{model}/versions/{version}/infer", summary="Infer (given version)",
             openapi_extra=_INFER_DOC, responses=_INFER_ERRORS, response_class=Response)
@direct()
async def infer_version(request: Request, model: str, version: str) -> Response:
    return await infer_request(request, model, version)


async def infer_request(request: Request, model: str, version: str | None) -> Response:
    mv, ctx = admit(request, "v2_infer", model, version)
    await refuse_early(request, mv, pinned=version is not None)
    state = state_of(request)
    headers = request.headers
    body = await admission.read_infer_body(request, mv.config.batching.max_batch_size)
    received = perf_counter()  # a slow upload is the client's time, not the queue's to make up
    body = codec.decompress(body, headers.get("content-encoding"), state.settings.max_body_bytes)
    req = codec.decode_request(body, headers.get(codec.HEADER_LENGTH))
    ctx.rows = admission.rows_of(req)
    result = await inference.infer(mv, req, deadline(request, state, req.timeout_s),
                                   pinned=version is not None, arrived=received)
    ctx.timed(result.queue_s, result.compute_s, result.batch_rows)
    content, header_length = codec.encode_response(result.model_name, result.model_version, req,
                                                   result.outputs)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})


# -- model repository extension ----------------------------------------------------------------------

repository_router = APIRouter(tags=["v2 repository"])


async def _optional_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        return {}
    return codec.json_object(body, what="body")


@repository_router.post(
    "/v2/repository/index", summary="Repository index", response_model=list[RepositoryIndexEntry],
    openapi_extra={"requestBody": {"required": False, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/RepositoryIndexRequest"}, "example": {"ready": False}}}}},
)
async def repository_index(request: Request) -> Response:
    ready = (await _optional_json(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput("'ready' must be true or false")
    return _json(state_of(request).repository.index(ready_only=ready))


@repository_router.post("/v2/repository/models/{model}/load", summary="Load or reload a model",
                        responses={200: {"description": "Every version of the model is READY"},
                                   **_errors(400, 404)})
async def repository_load(request: Request, model: str) -> Response:
    params = (await _optional_json(request)).get("parameters") or {}
    await load_model(state_of(request), model, params)
    return Response(status_code=200)


async def load_model(state: ServiceState, model: str, params: Any) -> None:
    """Load or reload `model`; raises unless every version of it is READY afterwards."""
    if isinstance(params, dict) and any(k == "config" or k.startswith("file:") for k in params):
        raise Unsupported("loading with an overriding config or files is not supported; edit config.toml")
    m = await state.executor.load(model)
    if m.error:
        raise ModelLoadFailed(f"failed to load {model!r}: {m.error}")
    failed = [f"version {mv.version}: {mv.reason}"
              for mv in m.versions.values() if mv.state is not State.READY]
    if failed:
        raise ModelLoadFailed(f"failed to load {model!r}: " + "; ".join(failed))


@repository_router.post("/v2/repository/models/{model}/unload", summary="Unload a model",
                        responses={200: {"description": "Unloaded after its in-flight requests finished"},
                                   **_errors(400, 404)})
async def repository_unload(request: Request, model: str) -> Response:
    await _optional_json(request)
    await unload_model(state_of(request), model)
    return Response(status_code=200)


async def unload_model(state: ServiceState, model: str) -> None:
    await state.executor.unload(model)


router.include_router(repository_router)
