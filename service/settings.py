"""All service configuration in one place: command-line flags and `NEUROSERVE_*` environment variables.

The CLI turns every field below into a `--kebab-case` flag, so a flag and its environment variable
always mean the same thing (`--max-body-bytes` ⇔ `NEUROSERVE_MAX_BODY_BYTES`). Worker processes read
the environment only; the CLI exports the validated values before it starts them.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Providers = Literal["auto", "cuda", "cpu"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup CPU affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEUROSERVE_", extra="ignore", frozen=True)

    # Where and how to listen.
    model_repository: Path = Field(
        Path("models"), description="Directory with one folder per model (config.toml + version folders)"
    )
    host: str = Field("127.0.0.1", description="Interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="TCP port of the V2 gRPC API (0: no gRPC server)"
    )
    grpc_max_connection_age_s: float = Field(
        0.0, ge=0,
        description="Send GOAWAY on a gRPC connection this long after it opened (calls in flight "
                    "finish; clients reconnect, through a layer-4 balancer possibly to another "
                    "replica). 0: never",
    )
    workers: int = Field(1, ge=1, description="HTTP/gRPC front-end processes")
    executor: Literal["auto", "in-process", "process"] = Field(
        "auto", description="Where the models run: in-process (the front-end's own, only with one "
                            "worker), process (one executor process that every worker feeds), auto "
                            "(in-process with one worker, else process)"
    )

    # ONNX Runtime.
    providers: Providers = Field(
        "auto", description="auto: CUDA when it binds, else CPU; cuda: CUDA or fail; cpu: CPU only"
    )
    cuda_device_id: int = Field(0, ge=0, description="GPU ordinal for the CUDA provider")
    gpus: str = Field(
        "", description="Comma-separated GPU ordinals, one executor process each (e.g. 0,1): every "
                        "model is loaded on each, a request goes to the least busy; empty: one "
                        "executor on --cuda-device-id"
    )
    gpu_mem_limit_mb: int = Field(0, ge=0, description="CUDA arena limit per session in MiB (0: no limit)")
    cudnn_conv_algo_search: Literal["exhaustive", "heuristic", "default"] = Field(
        "exhaustive", description="How the CUDA provider picks convolution algorithms for a new input shape"
    )
    cuda_static_batch: bool = Field(
        True, description="On CUDA, pad batches of fixed-shape inputs to max_batch_size rows (one shape)"
    )
    intra_op_threads: int = Field(
        0, ge=0, description="Threads per ORT session (0: (cores − workers) / (workers × instances), ≥ 1)"
    )
    inter_op_threads: int = Field(1, ge=1, description="ORT inter-op threads (graphs run sequentially)")
    graph_optimization: GraphOptimization = Field("all", description="ORT graph optimisation level")
    warmup: bool = Field(True, description="Run every batch shape once before reporting ready")

    # Model management.
    model_control_mode: Literal["explicit", "poll"] = Field(
        "explicit", description="explicit: models change through POST /v2/repository/models/{m}/load "
                                "and unload; poll: also load changed or new models and unload removed "
                                "ones by watching the repository"
    )
    repository_poll_s: float = Field(
        2.0, gt=0, description="Poll interval; a change is loaded once its files stayed the same this long"
    )

    # Readiness and shutdown.
    strict_readiness: bool = Field(
        True, description="Server ready only when every model to load is READY (else: when any is)"
    )
    drain_timeout_s: float = Field(30.0, gt=0, description="Longest wait for in-flight work on SIGTERM")
    drain_grace_s: float = Field(
        5.0, ge=0,
        description="On SIGTERM, keep serving this long while not ready (load balancers move traffic "
                    "away; responses close their connection), then stop accepting",
    )

    # Who may call what, and how much (service.auth).
    api_keys_file: Path | None = Field(
        None, description="TOML file of API keys (`neuroserve keys create`); when set, every "
                          "endpoint but probes, docs and /metrics needs 'Authorization: Bearer <key>'"
    )
    protect_metrics: bool = Field(False, description="With API keys, /metrics needs a key too")
    allow_unauthenticated_admin: bool = Field(
        False, description="Without API keys, allow repository load/unload although the server "
                           "listens beyond loopback"
    )
    anonymous_rate: float = Field(
        0.0, ge=0, description="Requests per second per worker for callers without a key (0: no limit)"
    )
    cors_origins: str = Field(
        "", description="Comma-separated origins allowed to call from a browser (empty: no CORS)"
    )
    audit_log: Path | None = Field(
        None, description="Also append the audit log (state-changing calls, auth failures) to this file"
    )

    # TLS for REST and gRPC.
    ssl_certfile: Path | None = Field(None, description="TLS certificate chain (PEM); TLS is on when set")
    ssl_keyfile: Path | None = Field(None, description="TLS private key (PEM)")
    ssl_ca_certs: Path | None = Field(
        None, description="CA bundle (PEM) for client certificates; when set, clients must present one"
    )

    # Limits on what a request may carry.
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Largest request body")
    max_image_pixels: int = Field(25_000_000, gt=0, description="Largest image (width × height)")
    max_audio_duration_s: float = Field(30.0, gt=0, description="Longest audio clip in seconds")
    max_text_chars: int = Field(100_000, gt=0, description="Longest text in characters")
    max_text_tokens: int = Field(
        25_000, gt=0, description="Longest text in tokens for the text task endpoint, which reads a long "
        "text whole as overlapping windows of the model's max_tokens (a window is a row)"
    )
    max_items: int = Field(256, gt=0, description="Most texts/files in one task-endpoint request")
    max_explain_rows: int = Field(
        1024, gt=0, description="Most rows (inputs and their occluded copies) one explanation computes"
    )
    max_header_bytes: int = Field(64 * 1024, gt=0, description="Largest request line plus headers (431)")
    read_timeout_s: float = Field(
        30.0, gt=0,
        description="Longest wait for a request's line and headers, or between reads of its body (408)",
    )
    keep_alive_s: float = Field(
        5.0, gt=0, description="How long an idle HTTP/1.1 connection is kept open between requests (set "
        "it above the idle timeout of a load balancer in front, which must close first)",
    )
    default_timeout_ms: float = Field(
        0.0, ge=0, description="Deadline for requests that set none (0: no deadline)"
    )

    # Traces (OpenTelemetry, OTLP/HTTP): off unless an endpoint is set here or in the OTEL_* variables.
    otlp_endpoint: str = Field(
        "", description="OTLP/HTTP collector URL for traces, e.g. http://127.0.0.1:4318 (empty: "
                        "OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else no tracing)"
    )
    trace_sample_ratio: float = Field(
        1.0, ge=0, le=1,
        description="Share of requests without a sampled caller that are traced (parent-based; "
                    "OTEL_TRACES_SAMPLER/_ARG override it)",
    )
    trace_slow_ms: float = Field(
        1000.0, ge=0, description="Requests slower than this are traced whatever the sampler said (0: off)"
    )

    # Logs.
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")
    # Off by default: a log line costs about as much as the rest of a small model's request.
    access_log: bool = Field(False, description="One JSON log line per request")

    @model_validator(mode="after")
    def _one_process_per_placement(self) -> Settings:
        if self.executor == "in-process" and self.workers > 1:
            raise ValueError("--executor in-process serves one worker; with several use process (or auto)")
        try:
            gpus = self.gpu_list
        except ValueError:
            raise ValueError(f"--gpus takes GPU ordinals like 0,1, not {self.gpus!r}") from None
        if len(set(gpus)) != len(gpus) or any(g < 0 for g in gpus):
            raise ValueError(f"--gpus lists each GPU once: {self.gpus!r}")
        if len(gpus) > 1 and self.executor == "in-process":
            raise ValueError("--gpus with several GPUs runs an executor process per GPU")
        return self

    @field_validator("api_keys_file", "audit_log", "ssl_certfile", "ssl_keyfile", "ssl_ca_certs",
                     mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        return None if value in ("", "None") else value

    @cached_property
    def cores(self) -> int:
        return available_cores()

    @property
    def gpu_list(self) -> list[int]:
        return [int(g) for g in self.gpus.split(",") if g.strip()]

    @property
    def executor_process(self) -> bool:
        """Whether the models run in executor processes of their own."""
        return (self.executor == "process" or len(self.gpu_list) > 1
                or (self.executor == "auto" and self.workers > 1))

    def intra_op_threads_for(self, instances: int) -> int:
        """Threads for one session so that the sessions fit in the cores beside the front-ends.

        Each front-end's event loop needs about a core of its own under load (HTTP, JSON); one
        executor runs every model, and each instance of a model may compute at the same time as
        the others. So the cores left after the event loops are shared out, never oversubscribed:
        on 2 cores with 1 worker, ORT gets 1 thread and the event loop the other core.
        """
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, (self.cores - self.workers) // instances)

    def to_environ(self) -> dict[str, str]:
        """The `NEUROSERVE_*` variables that rebuild these exact settings in a worker process."""
        env = {}
        for key, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            env[f"NEUROSERVE_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env
