"""The reference server the benchmark compares neuroserve with: the obvious FastAPI app.

Built for comparison only, deliberately plain: one ONNX Runtime session per worker process, a
pydantic request body (V2 JSON shape, so the very same request bodies go to both servers),
`session.run` called per request inside the async handler, no batching, FastAPI's default JSON
response (`BENCH_REF_PROVIDER=cuda` puts the session on the CUDA provider). Run it the way such an
app is deployed:

    BENCH_REF_MODEL=models/fashion-mnist/1/model.onnx BENCH_REF_ORT_THREADS=1 \\
        uvicorn bench.reference_server:create_app --factory --host 127.0.0.1 --port 8100 --workers 2
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from bench import raw_ort
from bench.workloads import V2_TO_NUMPY

NUMPY_TO_V2 = {v: k for k, v in V2_TO_NUMPY.items()}


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput]
    outputs: list[dict[str, Any]] | None = None
    parameters: dict[str, Any] | None = None


def create_app() -> FastAPI:
    path = os.environ["BENCH_REF_MODEL"]
    threads = int(os.environ.get("BENCH_REF_ORT_THREADS", "1"))
    session = raw_ort.session(Path(path), threads, os.environ.get("BENCH_REF_PROVIDER", "cpu"))
    name = os.environ.get("BENCH_REF_NAME", os.path.basename(os.path.dirname(os.path.dirname(path))))
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        return {"ready": True}

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: InferRequest) -> dict:
        if model_name != name:
            raise HTTPException(404, f"unknown model {model_name}")
        feed = {
            t.name: np.asarray(t.data, dtype=V2_TO_NUMPY[t.datatype]).reshape(t.shape)
            for t in request.inputs
        }
        results = session.run(None, feed)
        return {
            "model_name": name,
            "id": request.id,
            "outputs": [
                {"name": meta.name, "shape": list(arr.shape), "datatype": NUMPY_TO_V2[str(arr.dtype)],
                 "data": arr.ravel().tolist()}
                for meta, arr in zip(session.get_outputs(), results, strict=True)
            ],
        }

    return app
