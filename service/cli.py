"""`neuroserve serve`: validate the settings, prepare multi-worker metrics, start uvicorn.

Every `Settings` field is a flag here (`--max-body-bytes` for `max_body_bytes`); a flag overrides
the matching `NEUROSERVE_*` environment variable, which overrides the default.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import ValidationError

from service import __version__
from service.auth import cli as keys_cli
from service.core.wire import EXECUTOR_SOCKETS_ENV, Address
from service.observability import logging as service_logging
from service.server import tls, workers
from service.settings import Settings

log = logging.getLogger("neuroserve.cli")


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(annotation) is typing.Literal:
        return {"choices": list(get_args(annotation))}
    return {}  # a string; pydantic converts and validates it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuroserve", description="ONNX inference service")
    parser.add_argument("--version", action="version", version=f"neuroserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve the model repository over HTTP",
        description="Every option can also be set by the environment variable NEUROSERVE_<OPTION> "
                    "(e.g. NEUROSERVE_PORT=9000).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"NEUROSERVE_{name.upper()}"
        serve.add_argument(flag, dest=name, default=None, help=f"{field.description} [{env}; default "
                           f"{field.default}]", **_flag_kwargs(field.annotation))
    keys_cli.add_parser(commands)
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Flags over environment over defaults (raises pydantic.ValidationError)."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keys":
        return keys_cli.run(args)
    try:
        settings = parse_settings(argv)
    except ValidationError as e:
        print(f"neuroserve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    return serve(settings)


def serve(settings: Settings) -> int:
    service_logging.configure(settings.log_level)
    if not settings.model_repository.is_dir():
        log.error("model repository %s is not a directory", settings.model_repository)
        return 2
    problem = _security_problem(settings)
    if problem:
        log.error("%s", problem)
        return 2
    if settings.providers == "cuda":
        problem = _cuda_problem(settings)
        if problem:
            # Fail before serving: a "GPU" deployment quietly computing on CPU is worse than none.
            log.error("--providers cuda: %s (or use --providers auto|cpu)", problem)
            return 2
    # Workers are separate processes that read their settings from the environment.
    os.environ.update(settings.to_environ())
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    os.environ.pop(EXECUTOR_SOCKETS_ENV, None)
    executors: list[tuple[Address, int | None]] = []
    if settings.workers > 1 or settings.executor_process:
        # A fresh directory per run: values from an earlier run must not leak into this one.
        directory = tempfile.mkdtemp(prefix="neuroserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    if settings.executor_process:
        sockets = tempfile.mkdtemp(prefix="neuroserve-executor-")
        atexit.register(shutil.rmtree, sockets, ignore_errors=True)
        gpus: list[int | None] = list(settings.gpu_list) or [None]
        executors = []
        for i, gpu in enumerate(gpus):
            directory = Path(sockets) / str(i)
            directory.mkdir()
            executors.append((Address(directory), gpu))
        os.environ[EXECUTOR_SOCKETS_ENV] = os.pathsep.join(str(a.directory) for a, _ in executors)

    import uvicorn

    log.info("starting", extra={"host": settings.host, "port": settings.port, "workers": settings.workers,
                                "providers": settings.providers, "cores": settings.cores,
                                "model_repository": str(settings.model_repository)})
    server = {
        "app": "service.server.app:create_app",
        "factory": True,
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": "service.server.http_protocol:HttpProtocol",
        "log_config": service_logging.config_dict(settings.log_level),
        "access_log": False,  # the service writes its own access line, with request id and model
        "server_header": False,
        "backlog": 2048,
        "timeout_keep_alive": settings.keep_alive_s,
        "timeout_graceful_shutdown": int(settings.drain_timeout_s) + 5,
        **tls.uvicorn_options(settings),
    }
    if settings.workers > 1 or executors:
        # A listening socket per worker (see service.server.workers), not uvicorn's shared one.
        return workers.serve(server, workers=settings.workers, host=settings.host, port=settings.port,
                             stop_timeout_s=settings.drain_timeout_s + settings.drain_grace_s + 10,
                             executors=executors)
    uvicorn.run(**server)
    return 0


def _security_problem(settings: Settings) -> str | None:
    """A keys file or TLS file that cannot be used stops the start, rather than serving open."""
    from service.auth.keys import KeyFileError, read_keys

    if settings.api_keys_file is not None:
        try:
            read_keys(settings.api_keys_file)
        except KeyFileError as e:
            return str(e)
    return tls.problem(settings)


def _cuda_problem(settings: Settings) -> str | None:
    """Try CUDA on the first model of the repository (onnxruntime-gpu may fall back silently)."""
    from service.core.runtime import cuda_binds

    first = next(iter(sorted(settings.model_repository.glob("*/[0-9]*/model.onnx"))), None)
    return cuda_binds(first, settings)


if __name__ == "__main__":
    raise SystemExit(main())
