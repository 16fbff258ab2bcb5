"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.errors import ServerNotReady
from service.observability import metrics
from service.server.state import ServiceState

router = APIRouter(tags=["health"])


def state_of(request: Request) -> ServiceState:
    return request.app.state.service


@router.get("/v2/health/live", summary="Server live", responses={200: {"description": "The process is up"}})
async def live() -> Response:
    return Response(status_code=200)


@router.get(
    "/v2/health/ready",
    summary="Server ready",
    responses={
        200: {"description": "Every model that should load is loaded and warmed up"},
        503: {"description": "Loading, a model failed (strict readiness) or shutting down",
              "model": None},
    },
)
async def ready(request: Request) -> Response:
    state = state_of(request)
    if not state.ready():
        if state.draining:
            raise ServerNotReady("server is shutting down")
        if state.repository.loading:
            raise ServerNotReady("models are still loading")
        raise ServerNotReady("not every model is ready; see POST /v2/repository/index")
    return Response(status_code=200)


# Some load balancers probe with HEAD (e.g. HAProxy's `option httpchk HEAD`): the same answers,
# without a body, and left out of the OpenAPI schema (one operation per route there).
router.add_api_route("/v2/health/live", live, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/v2/health/ready", ready, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def prometheus(request: Request) -> Response:
    openmetrics = "application/openmetrics-text" in request.headers.get("accept", "")
    body, content_type = metrics.exposition(openmetrics)
    return Response(body, media_type=content_type)
