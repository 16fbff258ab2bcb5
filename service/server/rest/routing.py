"""The prediction routes served without FastAPI's per-request machinery, found in the one route table.

FastAPI puts four middlewares (server errors, exception telemetry, body limit, handled exceptions),
an exit stack, the router and per-route parameter solving around every route: on a small model's
request they cost about as much CPU as the route itself. A route whose endpoint is marked `direct`
is declared, documented and routable as usual; `DirectRoutes`, built from the routers' own routes,
additionally runs it with only `ServiceMiddleware` around it. Nothing is matched a second time by
hand: matching is the route's own (`BaseRoute.matches`), so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[..., Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]
E = TypeVar("E", bound=Callable[..., Any])
_ATTRIBUTE = "direct_handler"


def direct(handler: Handler | None = None) -> Callable[[E], E]:
    """Mark a POST endpoint to be served directly: `handler(request, **path_params)` answers it (the
    endpoint itself when None, which then must take only the request and the path parameters).
    Whatever else the endpoint declares (query parameters) the handler reads and checks itself."""

    def mark(endpoint: E) -> E:
        setattr(endpoint, _ATTRIBUTE, handler or endpoint)
        return endpoint

    return mark


class DirectRoutes:
    """ASGI: a request for a directly served route goes to its handler inside `middleware`; every
    other request, and any request with a root path, goes to `stack` (the full application)."""

    def __init__(self, routers: Iterable[APIRouter], stack: ASGIApp,
                 middleware: Callable[[ASGIApp], ASGIApp],
                 error_handlers: dict[type[Exception], ErrorHandler]) -> None:
        self.routes = [(route, handler) for router in routers for route in router.routes
                       if isinstance(route, APIRoute)
                       and (handler := getattr(route.endpoint, _ATTRIBUTE, None)) is not None]
        self.stack = stack
        self.serve = middleware(self._serve)
        self.error_handlers = tuple(error_handlers.items())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            for route, handler in self.routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child_scope)
                    scope["direct_handler"] = handler
                    await self.serve(scope, receive, send)
                    return
        await self.stack(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await scope["direct_handler"](request, **scope["path_params"])
        except Exception as exc:
            for kind, handle in self.error_handlers:
                if isinstance(exc, kind):
                    response = await handle(request, exc)
                    break
            else:
                raise
        await response(scope, receive, send)
