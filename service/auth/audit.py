"""The audit log: one JSON line per state-changing call and per authentication or authorization
failure, naming who (key name, client address), what (method and path, or gRPC method) and the
result. Written by the `neuroserve.audit` logger (stderr with the other logs), and also appended to
`--audit-log FILE` when set."""

from __future__ import annotations

import logging
from pathlib import Path

from service.observability.logging import JsonFormatter

log = logging.getLogger("neuroserve.audit")


def configure(path: Path | None) -> None:
    if path is None or any(getattr(h, "_neuroserve_audit", False) for h in log.handlers):
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    handler._neuroserve_audit = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


def record(event: str, *, key: str | None, action: str, status: int | str, client: str | None,
           reason: str | None = None) -> None:
    """`event`: `admin` (a state-changing call, whatever its result) or `denied` (refused by
    authentication, scope, quota or the cross-origin checks)."""
    log.info("%s %s %s", event, action, status, extra={
        "event": event, "key": key, "action": action, "status": status, "client": client,
        "reason": reason})
