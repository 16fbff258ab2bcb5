"""TLS for both transports from the same three settings: `--ssl-certfile`/`--ssl-keyfile` turn it
on, `--ssl-ca-certs` also requires clients to present a certificate signed by that CA."""

from __future__ import annotations

import ssl
from typing import Any

import grpc

from service.settings import Settings


def problem(settings: Settings) -> str | None:
    """Why these TLS settings cannot be used (None: they can)."""
    if (settings.ssl_certfile is None) != (settings.ssl_keyfile is None):
        return "--ssl-certfile and --ssl-keyfile go together"
    if settings.ssl_ca_certs is not None and settings.ssl_certfile is None:
        return "--ssl-ca-certs (client certificates) needs --ssl-certfile and --ssl-keyfile"
    for path in (settings.ssl_certfile, settings.ssl_keyfile, settings.ssl_ca_certs):
        if path is not None and not path.is_file():
            return f"{path} is not a file"
    return None


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's keyword arguments for TLS (none when TLS is off)."""
    if settings.ssl_certfile is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(settings.ssl_certfile),
                               "ssl_keyfile": str(settings.ssl_keyfile)}
    if settings.ssl_ca_certs is not None:
        options.update(ssl_ca_certs=str(settings.ssl_ca_certs), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


def grpc_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gRPC server's credentials (None when TLS is off)."""
    if settings.ssl_certfile is None or settings.ssl_keyfile is None:
        return None
    ca = settings.ssl_ca_certs.read_bytes() if settings.ssl_ca_certs is not None else None
    return grpc.ssl_server_credentials(
        [(settings.ssl_keyfile.read_bytes(), settings.ssl_certfile.read_bytes())],
        root_certificates=ca, require_client_auth=ca is not None)
