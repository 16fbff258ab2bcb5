"""Every error a request can meet, each with the HTTP status, the gRPC status (by its name in
`grpc.StatusCode`) and the machine-readable code it maps to.

Routes raise these; one exception handler in `service.server.app` turns them into
`{"error": message, "code": code}` JSON with `status`, and the gRPC servicer aborts with `grpc`.
Nothing else decides a status code.
"""

from __future__ import annotations


class ServiceError(Exception):
    status: int = 500
    grpc: str = "INTERNAL"
    code: str = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidInput(ServiceError):
    """The request is well-formed HTTP but its content is wrong: shape, datatype, values."""

    status = 400
    grpc = "INVALID_ARGUMENT"
    code = "invalid_input"


class ModelNotFound(ServiceError):
    status = 404
    grpc = "NOT_FOUND"
    code = "model_not_found"


class PayloadTooLarge(ServiceError):
    status = 413
    grpc = "RESOURCE_EXHAUSTED"
    code = "too_large"


class UnsupportedMedia(ServiceError):
    status = 415
    grpc = "INVALID_ARGUMENT"
    code = "unsupported_media"


class QueueFull(ServiceError):
    status = 429
    grpc = "RESOURCE_EXHAUSTED"
    code = "queue_full"


class ModelNotReady(ServiceError):
    status = 503
    grpc = "UNAVAILABLE"
    code = "not_ready"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        # Every 503 says when to try again: a loading model or a draining server is temporary.
        super().__init__(message, headers={"Retry-After": "1", **(headers or {})})


class ServerNotReady(ModelNotReady):
    """The readiness probe's 503: an answer about the server, not a refused request, so it is not
    counted in `neuroserve_rejections_total` (a probe polling a loading server would inflate it)."""


class Unauthorized(ServiceError):
    """No API key, or one the server does not know (HTTP adds `WWW-Authenticate`)."""

    status = 401
    grpc = "UNAUTHENTICATED"
    code = "unauthorized"


class Forbidden(ServiceError):
    """A known key without the scope the endpoint needs, a state-changing call the deployment does
    not allow without a key, or a forged cross-origin browser request."""

    status = 403
    grpc = "PERMISSION_DENIED"
    code = "forbidden"


class RateLimited(ServiceError):
    """The caller's token bucket is empty (HTTP adds `Retry-After` and the `RateLimit-*` headers)."""

    status = 429
    grpc = "RESOURCE_EXHAUSTED"
    code = "rate_limited"


class DeadlineExceeded(ServiceError):
    """The request waited longer than its deadline; it was shed before any compute was spent."""

    status = 504
    grpc = "DEADLINE_EXCEEDED"
    code = "deadline"


class InferenceFailed(ServiceError):
    """ONNX Runtime raised while running a batch: only that batch's requests see this."""

    status = 500
    code = "inference_failed"


class ModelLoadFailed(ServiceError):
    """A repository load request could not make the model READY (the reason says why)."""

    status = 400
    grpc = "INVALID_ARGUMENT"
    code = "load_failed"


class Unsupported(ServiceError):
    """The request asks for something this deployment cannot do (e.g. repository control with
    several worker processes, where each worker holds its own copy of the models)."""

    status = 400
    grpc = "FAILED_PRECONDITION"
    code = "unsupported"



# Which `neuroserve_rejections_total` reason each refusal counts as, whichever transport refused it
# (by exact type: ServerNotReady, the readiness probe's answer, is not a refusal).
REJECTION_REASONS: dict[type[ServiceError], str] = {
    QueueFull: "queue_full",
    DeadlineExceeded: "deadline",
    PayloadTooLarge: "too_large",
    InvalidInput: "invalid",
    UnsupportedMedia: "invalid",
    ModelNotReady: "not_ready",
    Unauthorized: "unauthorized",
    Forbidden: "forbidden",
    RateLimited: "rate_limited",
}
