"""Every status a route can answer, in the OpenAPI schema: what the front-end adds to each route
(authentication, quotas, body limits, not-ready), the routes whose 200 has no body, and the API key
scheme when keys are required. Checked by schemathesis (tests/service/test_openapi_conformance.py).
"""

from __future__ import annotations

from typing import Any

from service.auth.gate import http_scope
from service.settings import Settings

ERROR_BODY = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
DESCRIPTIONS = {
    400: "Invalid request",
    401: "No API key, or an unknown or revoked one (with `WWW-Authenticate`)",
    403: "The key lacks the scope, the deployment allows no unauthenticated change, or the request "
         "came from a foreign origin",
    404: "No such model, version or route",
    413: "Request body over `--max-body-bytes`",
    415: "A state-changing endpoint called with a content type a web page could send (CSRF)",
    429: "The caller's rate limit (with `Retry-After` and `RateLimit-*`) or the model's queue is full",
    503: "The model or the server is not ready, or is shutting down (with `Retry-After`)",
}
# Routes that answer 200 with an empty body.
EMPTY_200 = {("get", "/v2/health/live"), ("get", "/v2/health/ready"),
             ("post", "/v2/repository/models/{model}/load"),
             ("post", "/v2/repository/models/{model}/unload")}
# Header parameters with bounds the schema should state (the server refuses values outside them).
HEADER_BOUNDS = {"Inference-Header-Content-Length": {"type": "integer", "minimum": 1},
                 "X-Request-Timeout-Ms": {"type": "number", "exclusiveMinimum": 0}}


def complete(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            statuses = set()
            scope = http_scope(method.upper(), path, settings.protect_metrics)
            if scope != "open":
                statuses |= {401, 403, 429}
            if scope == "admin":
                statuses.add(415)
            if method == "post":
                statuses |= {400, 413}
            if "{model}" in path:
                statuses |= {404, 503}
            for status in sorted(statuses):
                existing = responses.get(str(status))
                if existing is None or not existing.get("content") \
                        or "application/json" not in existing["content"]:
                    responses[str(status)] = {
                        "description": (existing or {}).get("description") or DESCRIPTIONS[status],
                        **ERROR_BODY}
            if (method, path) in EMPTY_200 and "200" in responses:
                responses["200"].pop("content", None)
            for parameter in op.get("parameters", ()):
                if parameter.get("in") == "header" and parameter.get("name") in HEADER_BOUNDS:
                    parameter["schema"] = HEADER_BOUNDS[parameter["name"]]
            if scope != "open" and settings.api_keys_file is not None:
                op["security"] = [{"apiKey": []}]
    if settings.api_keys_file is not None:
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
            "type": "http", "scheme": "bearer",
            "description": "An API key from `neuroserve keys create`: `Authorization: Bearer <key>`"}
    return schema
