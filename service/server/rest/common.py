"""Small helpers the V2 and task routes share: model lookup with bookkeeping, deadlines, input metrics."""

from __future__ import annotations

from fastapi import Request

from service.auth.gate import priority_ceiling
from service.core.catalog import ModelVersion
from service.errors import InvalidInput
from service.server.http_protocol import ADMITTED_AT_HEAD
from service.server.rest.middleware import RequestContext, context
from service.server.state import ServiceState

TIMEOUT_HEADER = "x-request-timeout-ms"


def state_of(request: Request) -> ServiceState:
    return request.app.state.service


def admit(
    request: Request, endpoint: str, model: str, version: str | None
) -> tuple[ModelVersion, RequestContext]:
    """Find the model version to serve and count the request as in flight (for drain on SIGTERM).

    Labels metrics with the model name only once the name is known to the repository, so that
    arbitrary names in URLs never become metric labels.
    """
    state = state_of(request)
    ctx = context(request.scope)
    ctx.endpoint = endpoint
    if model in state.repository.models:
        ctx.model = model
    mv = state.model(model, version)
    ctx.model_metrics = mv.metrics
    state.active += 1
    ctx.admitted = True
    return mv, ctx


# A refused request's body up to this size is read (not parsed) so that its connection stays open;
# a larger one is left unread and the connection closes after the answer.
READ_REFUSED_BODY_BYTES = 64 * 1024


async def refuse_early(request: Request, mv: ModelVersion, pinned: bool = False) -> None:
    """Refuse, before the body is decoded, a request the model's queue would refuse anyway: full, or
    expected to wait longer than `max_queue_wait_ms` even at the highest class its key allows.
    (With several workers the queue is in the executor process, which decides on arrival; the worker
    refuses only while the executor's last reply said the queue refuses.) A request the HTTP protocol
    admitted from its head was judged already, with the requests read beside it."""
    if request.scope.get(ADMITTED_AT_HEAD):
        return
    refused = mv.serving_batcher(pinned).refusal(1, priority_ceiling.get())
    if refused is None:
        return
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) <= READ_REFUSED_BODY_BYTES:
        await request.body()
    raise refused


def deadline(request: Request, state: ServiceState, timeout_s: float | None = None) -> float | None:
    """perf_counter() deadline from V2 `parameters.timeout`, the timeout header, or the default."""
    if timeout_s is None:
        header = request.headers.get(TIMEOUT_HEADER)
        if header is not None:
            try:
                ms = float(header)
            except ValueError:
                raise InvalidInput(f"{TIMEOUT_HEADER} must be a number of milliseconds") from None
            if not ms > 0:
                raise InvalidInput(f"{TIMEOUT_HEADER} must be positive")
            timeout_s = ms / 1000
        elif state.settings.default_timeout_ms:
            timeout_s = state.settings.default_timeout_ms / 1000
    if timeout_s is None:
        return None
    # Counted from arrival: time spent reading and decoding the body is part of the budget.
    return context(request.scope).start + timeout_s
