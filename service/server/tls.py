"""TLS for both transports from the same three settings: `--ssl-certfile`/`--ssl-keyfile` turn it
on, `--ssl-ca-certs` also requires clients to present a certificate signed by that CA."""

from __future__ import annotations

import ssl
from typing import Any

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


def grpc_context(settings: Settings) -> ssl.SSLContext | None:
    """The gRPC listener's TLS context (None when TLS is off): HTTP/2 chosen by ALPN, as gRPC
    clients require."""
    if settings.ssl_certfile is None or settings.ssl_keyfile is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    if settings.ssl_ca_certs is not None:
        context.load_verify_locations(settings.ssl_ca_certs)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context
