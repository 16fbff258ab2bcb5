"""The decision taken from a request's head, before its body is read: which scope the endpoint
needs, whether the caller's key grants it, whether a browser could have forged the request, and the
caller's quota. REST (service.server.rest.middleware) and gRPC (service.server.grpc.server) ask the
same gate, so both protocols accept and refuse alike.

Scopes: `infer` (prediction routes and metadata), `admin` (repository load/unload: whatever changes
what is served; it implies `infer`). Health probes, `/metrics` (unless `--protect-metrics`), the
page at `/` and the API docs are open.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import threading
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from service.auth import audit
from service.auth import metrics as key_metrics
from service.auth.keys import ApiKey, KeyStore
from service.auth.quota import Quotas
from service.errors import Forbidden, RateLimited, ServiceError, Unauthorized, UnsupportedMedia
from service.settings import Settings

Scope = Literal["open", "infer", "admin"]

# Content types a browser may send cross-origin without a CORS preflight ("simple" requests).
SIMPLE_CONTENT_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded",
                                  "multipart/form-data"})
_OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/docs", "/redoc",
                         "/openapi.json", "/favicon.ico"})
_OPEN_PREFIXES = ("/ui/", "/docs/assets/")
_BEARER = "bearer "
REALM = 'Bearer realm="neuroserve"'

# gRPC methods of inference.GRPCInferenceService that change state; health and reflection are open.
_GRPC_ADMIN = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})
_GRPC_OPEN = frozenset({"ServerLive", "ServerReady"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def http_scope(method: str, path: str, protect_metrics: bool) -> Scope:
    if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
        return "open"
    if path == "/metrics":
        return "infer" if protect_metrics else "open"
    if method == "POST" and path.startswith("/v2/repository/models/") \
            and path.endswith(("/load", "/unload")):
        return "admin"
    return "infer"


def grpc_scope(method: str) -> Scope:
    """`method`: the full name, e.g. `/inference.GRPCInferenceService/ModelInfer`."""
    service, _, name = method.rpartition("/")
    if not service.endswith("inference.GRPCInferenceService"):
        return "open"  # grpc.health.v1, server reflection
    if name in _GRPC_ADMIN:
        return "admin"
    return "open" if name in _GRPC_OPEN else "infer"


@dataclass(slots=True)
class Caller:
    """Who a request is from, once the gate let it through."""

    key: ApiKey | None
    headers: dict[str, str] = field(default_factory=dict)  # RateLimit-* to send back

    @property
    def name(self) -> str | None:
        return self.key.name if self.key else None

    @property
    def priority(self) -> int:
        return self.key.priority if self.key else 0


OPEN = Caller(None)

# The highest priority class the request being served may ask for: its key's `priority` (set by the
# REST middleware and the gRPC interceptor); 0 for callers without a key.
priority_ceiling: ContextVar[int] = ContextVar("priority_ceiling", default=0)


def priority_of(requested: int | None) -> int:
    """A request's class: what it asked for (V2 `parameters.priority`), at most its key's; the key's
    when it asked for none."""
    ceiling = priority_ceiling.get()
    return ceiling if requested is None else min(requested, ceiling)


class Gate:
    """One per worker process (`Gate.of(state)`), shared by every route and both protocols, so a
    key's quota is one bucket however it calls."""

    _gates: ClassVar[weakref.WeakKeyDictionary[object, Gate]] = weakref.WeakKeyDictionary()

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = KeyStore.open(settings.api_keys_file) if settings.api_keys_file else None
        self.quotas = Quotas()
        self.protect_metrics = settings.protect_metrics
        self.admin_without_key = settings.allow_unauthenticated_admin or is_loopback(settings.host)
        self.open_infer = self.keys is None and not settings.anonymous_rate
        self.cors_origins = frozenset(o.strip().rstrip("/") for o in settings.cors_origins.split(",")
                                      if o.strip())
        audit.configure(settings.audit_log)
        self._reload_on_sighup()

    @classmethod
    def of(cls, owner: object) -> Gate:
        """The gate of a worker's `ServiceState` (made on first use, from its settings)."""
        gate = cls._gates.get(owner)
        if gate is None:
            gate = cls._gates[owner] = cls(owner.settings)  # type: ignore[attr-defined]
        return gate

    def _reload_on_sighup(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        keys = self.keys

        def reload() -> None:
            if keys is not None:
                keys.reload()

        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
        except RuntimeError:  # no running loop (the gate was made outside the server)
            signal.signal(signal.SIGHUP, lambda signum, frame: reload())

    # -- the checks -----------------------------------------------------------------------------------

    def authenticate(self, scope: Scope, authorization: str | None) -> Caller:
        """The caller for a request needing `scope`; raises Unauthorized/Forbidden/RateLimited."""
        if scope == "open":
            return OPEN
        key = None
        if self.keys is not None:
            if not authorization:
                raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'",
                                   headers={"WWW-Authenticate": REALM})
            if not authorization[:len(_BEARER)].lower() == _BEARER:
                raise Unauthorized("the Authorization header must be 'Bearer <key>'",
                                   headers={"WWW-Authenticate": REALM})
            key = self.keys.find(authorization[len(_BEARER):].strip())
            if key is None:
                raise Unauthorized("unknown or revoked API key",
                                   headers={"WWW-Authenticate": REALM + ', error="invalid_token"'})
            if not key.allows(scope):
                raise _by(Forbidden(f"API key {key.name!r} lacks the {scope!r} scope"), key)
        elif scope == "admin" and not self.admin_without_key:
            raise Forbidden("state-changing endpoints need an API key with the 'admin' scope: start "
                            "the server with --api-keys-file (or --allow-unauthenticated-admin)")
        if key is not None and key.rows > 0:
            retry_after = self.quotas.rows_admit(key.name, key.rows)
            if retry_after is not None:
                raise _by(RateLimited(f"row rate of {key.rows:g} rows/s exceeded for API key {key.name!r}",
                                      headers={"Retry-After": retry_after}), key)
        rate = key.rate if key is not None else self.settings.anonymous_rate
        caller = Caller(key)
        if rate > 0:
            allowed, caller.headers = self.quotas.take(key.name if key else "", rate)
            if not allowed:
                raise _by(RateLimited(f"rate limit of {rate:g} requests/s exceeded"
                                      + (f" for API key {key.name!r}" if key else ""),
                                      headers=caller.headers), key)
        return caller

    def check_http(self, scope: dict) -> tuple[Scope, Caller]:  # type: ignore[type-arg]
        """The REST check from an ASGI scope's method, path and headers."""
        endpoint = http_scope(scope["method"], scope["path"], self.protect_metrics)
        if endpoint == "open" or (endpoint == "infer" and self.open_infer):
            return endpoint, OPEN  # nothing to check: no keys, no anonymous rate
        authorization = content_type = origin = host = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"host":
                host = value.decode("latin-1")
        try:
            caller = self.authenticate(endpoint, authorization)
            if endpoint == "admin":
                try:
                    self._not_forged(content_type, origin, host)
                except ServiceError as exc:
                    raise _by(exc, caller.key) from None
        except ServiceError as exc:
            self.refused(exc, action=f"{scope['method']} {scope['path']}", client=_client(scope))
            raise
        key_metrics.admitted(caller.name)
        return endpoint, caller

    def _not_forged(self, content_type: str | None, origin: str | None, host: str | None) -> None:
        """A state-changing request a web page could have sent is refused: a CORS-simple content
        type (no preflight; 415), or an `Origin` that is neither this server nor an allowed one."""
        media = (content_type or "").split(";", 1)[0].strip().lower()
        if media in SIMPLE_CONTENT_TYPES:
            raise UnsupportedMedia(f"{media} is not accepted by state-changing endpoints; send "
                                   "application/json (or no body)")
        if origin is not None and origin != "null" and origin.rstrip("/") not in self.cors_origins \
                and (host is None or origin.rstrip("/") not in (f"http://{host}", f"https://{host}")):
            raise Forbidden(f"cross-origin request from {origin} refused (see --cors-origins)")
        if origin == "null":
            raise Forbidden("request from an opaque origin refused")

    def charge_rows(self, key_name: str | None, rows: int) -> None:
        """Charge an answered request's rows to its key's row bucket (if the key has one)."""
        if key_name is None or self.keys is None or rows <= 0:
            return
        key = self.keys.keys.get(key_name)
        if key is not None and key.rows > 0:
            self.quotas.charge_rows(key.name, key.rows, rows)

    @staticmethod
    def refused(exc: ServiceError, *, action: str, client: str | None) -> None:
        """Count and audit a refusal by `authenticate` or the forgery checks."""
        reason = {401: "unauthorized", 403: "forbidden", 415: "forbidden", 429: "rate_limited"}.get(
            exc.status, exc.code)
        key = key_of(exc)
        key_metrics.refused(key, reason)
        if exc.status != 429:  # a quota refusal is routine, not an audit event
            audit.record("denied", key=key, action=action, status=exc.status, client=client,
                         reason=exc.message)


def _by(exc: ServiceError, key: ApiKey | None) -> ServiceError:
    """Tag a refusal with the key it refused (for the audit log and the per-key metrics)."""
    exc.key_name = key.name if key else None  # type: ignore[attr-defined]
    return exc


def key_of(exc: ServiceError) -> str | None:
    return getattr(exc, "key_name", None)


def _client(scope: dict) -> str | None:  # type: ignore[type-arg]
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


def with_cors(app: Any, settings: Settings) -> Any:
    """`app` answering CORS for the origins of `--cors-origins` (none by default: then browsers on
    other origins can neither read answers nor send anything but simple requests, which
    state-changing endpoints refuse)."""
    origins = [o.strip().rstrip("/") for o in settings.cors_origins.split(",") if o.strip()]
    if not origins:
        return app
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(
        app, allow_origins=origins, allow_methods=["GET", "HEAD", "POST"],
        allow_headers=["Authorization", "Content-Type", "X-Request-ID", "X-Request-Timeout-Ms",
                       "Inference-Header-Content-Length", "Content-Encoding"],
        expose_headers=["X-Request-ID", "Server-Timing", "Retry-After", "RateLimit-Limit",
                        "RateLimit-Remaining", "RateLimit-Reset", "Inference-Header-Content-Length"],
        max_age=600)
