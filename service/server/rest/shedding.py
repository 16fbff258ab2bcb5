"""Refusing a V2 inference request from its head, inside the HTTP protocol, when the model's queue
would refuse it anyway (`Batcher.refusal`): no ASGI task, middleware, routing or body parsing is
spent on it, only a prepared 429. A refusal in the route cost the event loop enough that refusals
took the worker's time from the requests it could serve (docs/benchmarks.md, "Overload: shedding by
expected wait").

A request the queue admits from its head has its row reserved there until it is queued
(`Batcher.reserve`), so the hundreds of heads a busy event loop reads in one turn are judged
against each other, not each against the same queue; the route then does not judge it again.

Only where nothing else must be decided first: no API keys and no anonymous rate (a key's 401, 403
or quota, and its priority class, come before the queue's answer; those requests are refused by
the route, `service.server.rest.common.refuse_early`), the server not draining. With several
workers the queue is in the executor process: a worker refuses from the head while the executor's
last reply for the model said its queue refuses (`service.core.executor_client`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from time import perf_counter

import orjson
from fastapi.routing import APIRoute

from service.auth.gate import Gate
from service.errors import ServiceError
from service.observability import metrics
from service.server.rest import v2
from service.server.rest.middleware import new_request_id
from service.server.state import ServiceState

HeadRefusal = Callable[[bytes, float], bytes | bool | None]

# A refused request's response is kept per path for this long and sent again to the heads that
# are refused meanwhile, its message (the expected wait) up to that much older: under overload
# hundreds of heads a millisecond are refused, and writing each one's message and error cost a
# tenth of a refusal. Each head is still judged by the queue (`Batcher.refuses`), whose answer
# changes with every batch that leaves it.
RESPONSE_REUSE_S = 0.005


# The V2 infer routes' own patterns: the route table decides what an infer path is, here as for the
# router, rather than a second matcher written by hand.
_INFER_PATHS = [route.path_regex for route in v2.router.routes
                if isinstance(route, APIRoute) and route.endpoint in (v2.infer, v2.infer_version)]


_targets: dict[bytes, tuple[str, str | None] | None] = {}


def infer_target(path: bytes) -> tuple[str, str | None] | None:
    """(model, version or None) when `path` is one of the two V2 infer paths, else None."""
    try:
        return _targets[path]  # under overload the same few paths arrive thousands of times a second
    except KeyError:
        pass
    text = path.decode("latin-1")
    target = None
    for pattern in _INFER_PATHS:
        if (match := pattern.match(text)) is not None:
            params = match.groupdict()
            target = params["model"], params.get("version")
            break
    if len(_targets) >= 1024:  # paths come from clients
        _targets.clear()
    _targets[path] = target
    return target


def refuser(state: ServiceState, gate: Gate) -> HeadRefusal:
    """`refuse(path, started)` for a POST to `path` whose head began at `started` (`perf_counter`):
    the whole 429 response; True when admitted (its row reserved in the queue); None to let the
    app decide."""

    def refuse(path: bytes, started: float) -> bytes | None:
        if not gate.open_infer or state.draining:
            return None
        target = infer_target(path)
        if target is None:
            return None
        model, version = target
        try:
            mv = state.model(model, version)
            batcher = mv.serving_batcher(version is not None)
        except ServiceError:
            return None  # not found, not ready: the route says so
        now = perf_counter()
        held = holds.get(path)
        reused = held is not None and now < held[0]
        refused = batcher.refuses(1, 0) if reused else batcher.refusal(1, 0)
        if not refused:
            batcher.reserve(1)
            return True
        if not reused:
            held = holds[path] = (now + RESPONSE_REUSE_S,
                                  *_response(refused.message, refused.code, tuple(refused.headers.items())))
        metrics.defer_refusal(model, mv.metrics, "v2_infer", now - started)
        return held[1] + new_request_id().encode() + held[2]

    # Per path: (perf_counter() until which its response is reused, the response around its id).
    holds: dict[bytes, tuple[float, bytes, bytes]] = {}
    return refuse


@functools.lru_cache(maxsize=256)
def _response(message: str, code: str, headers: tuple[tuple[str, str], ...]) -> tuple[bytes, bytes]:
    """A 429 response, split where its request id goes: under overload the same few messages (the
    expected wait in whole milliseconds) are sent thousands of times a second."""
    body = orjson.dumps({"error": message, "code": code})
    head = "".join(f"{k.lower()}: {v}\r\n" for k, v in headers)
    return (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nx-request-id: " % len(body),
            b"\r\n%s\r\n%s" % (head.encode("latin-1"), body))
