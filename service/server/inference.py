"""The one inference path every transport takes once it has decoded a request.

A transport (V2 REST, V2 gRPC) looks the model version up with `ServiceState.model`, decodes its
wire format into a `codecs.v2.InferRequest` (tensors as numpy arrays, requested outputs with their
classification count, request id, timeout) and calls `infer`: the model-aware checks, the batcher
and the output selection happen here, so both protocols accept, refuse and answer alike. Errors are
the `service.errors` hierarchy; each transport maps them to its own status codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.auth.gate import priority_of
from service.codecs import v2 as codec
from service.codecs.v2 import InferRequest, RequestedOutput
from service.core.catalog import ModelVersion


@dataclass(slots=True)
class InferResult:
    model_name: str
    model_version: str
    outputs: list[tuple[RequestedOutput, np.ndarray]]  # as asked for, classification applied
    queue_s: float
    compute_s: float
    batch_rows: int


async def infer(mv: ModelVersion, req: InferRequest, deadline: float | None, *,
                pinned: bool = False, arrived: float | None = None) -> InferResult:
    """Check `req` against the model, queue it on the version's batcher and select its outputs.

    `deadline` is a `time.perf_counter()` value (None: none); `pinned`: the caller named the
    version, so no other may answer. The request's priority class is its `parameters.priority`
    bounded by its key's (`service.auth.gate.priority_of`); `arrived`: when the service had it whole
    (`perf_counter`), for the queue's admission bound. Raises `ServiceError`s only."""
    config = mv.config
    codec.check_outputs(req, config)
    feeds, rows = codec.to_feeds(req, config, mv.model.text)
    result = await mv.serving_batcher(pinned).submit(feeds, rows, deadline,
                                                     priority=priority_of(req.priority), arrived=arrived)
    selected = codec.select_outputs(req, result.outputs, mv.model.labels)
    # The version that computed it: a reload may have switched versions since `mv` was looked up.
    return InferResult(mv.name, result.version or str(mv.version), selected, result.queue_s,
                       result.compute_s, result.batch_rows)
