"""The messages between front-ends and the executor, over ZeroMQ.

A message is a multipart ZeroMQ message: one msgpack header (msgspec structs below), then one frame
per tensor holding its raw bytes. Tensors are never pickled or copied into the header: a front-end
sends the numpy array's own buffer (`copy=False` for large ones) and the receiver wraps the frame's
buffer with `np.frombuffer`, so a tensor is copied only by the kernel on its way through the socket.
docs/benchmarks.md ("Front-ends and the executor") has the measurements behind this choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

# The directory of the executor's sockets, set by the supervisor for the processes it starts.
EXECUTOR_SOCKETS_ENV = "NEUROSERVE_EXECUTOR_SOCKETS"


@dataclass(frozen=True)
class Address:
    """The executor's two sockets: requests (ROUTER) and catalog updates (PUB)."""

    directory: Path

    @property
    def requests(self) -> str:
        return f"ipc://{self.directory}/executor.sock"

    @property
    def events(self) -> str:
        return f"ipc://{self.directory}/catalog.sock"


# Frames below this size are copied into ZeroMQ's message (cheaper than tracking the buffer).
ZERO_COPY_BYTES = 64 * 1024


class Tensor(msgspec.Struct, array_like=True):
    name: str
    dtype: str
    shape: tuple[int, ...]


class Infer(msgspec.Struct, tag="infer", array_like=True):
    id: int
    model: str
    version: int | None
    pinned: bool  # the caller named the version: never serve another
    many: bool  # more rows than a batch allowed (`Batcher.submit_many`)
    rows: int
    timeout_s: float  # time left until the deadline; negative: none
    request_id: str | None
    inputs: list[Tensor]
    traced: bool = False  # the front-end traces this request: send back its batches' times
    priority: int = 0  # its class in the batcher (`Batcher.submit`)
    # When the front-end had the whole request (`perf_counter`: the machine's monotonic clock, the
    # same in every process); negative: unknown (`Batcher.submit`).
    arrived: float = -1.0


class Control(msgspec.Struct, tag="control", array_like=True):
    id: int
    op: str  # snapshot | load | unload | statistics
    model: str | None = None
    version: str | None = None


class Failure(msgspec.Struct, array_like=True):
    error: str  # a `service.errors` class name
    message: str
    headers: dict[str, str] = {}


class Reply(msgspec.Struct, array_like=True):
    id: int
    failure: Failure | None = None
    version: str = ""
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_rows: int = 0
    calls: int = 0
    outputs: list[Tensor] = []
    body: Any = None  # a control operation's answer (JSON-like)
    # For a traced request: (enqueued, start, end, failed, attributes) of each batch that computed it.
    batches: list[tuple[float, float, float, bool, dict[str, Any]]] = []
    # For an inference: how long the model's queue will still refuse a row of class 0 (0: it
    # admits now); front-ends refuse from requests' heads meanwhile (`Batcher.refusing_for`).
    refusing_s: float = 0.0


Request = Infer | Control

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_snapshot_decoder = msgspec.msgpack.Decoder()


def encode(message: msgspec.Struct | dict[str, Any]) -> bytes:
    return _encoder.encode(message)


def decode_request(data: bytes | memoryview) -> Request:
    return _request_decoder.decode(data)


def decode_reply(data: bytes | memoryview) -> Reply:
    return _reply_decoder.decode(data)


def decode_snapshot(data: bytes | memoryview) -> dict[str, Any]:
    return _snapshot_decoder.decode(data)


def tensors(arrays: dict[str, np.ndarray]) -> tuple[list[Tensor], list[memoryview | bytes]]:
    """Headers and frames for named arrays (made C-contiguous if they are not)."""
    metas, frames = [], []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        metas.append(Tensor(name, array.dtype.str, array.shape))
        frames.append(array.data if array.nbytes >= ZERO_COPY_BYTES else array.tobytes())
    return metas, frames


def zero_copy(frames: list[Any]) -> bool:
    """Whether to send `frames` without copying: only worth it for large buffers (ZeroMQ then tracks
    each one until sent, which costs more than copying a few KiB)."""
    return any(isinstance(f, memoryview) for f in frames)


def arrays(metas: list[Tensor], frames: list[Any]) -> dict[str, np.ndarray]:
    """The arrays of `metas` over the received frames' buffers (read-only views, no copy)."""
    if len(metas) != len(frames):
        raise ValueError(f"{len(metas)} tensors announced, {len(frames)} frames received")
    out = {}
    for meta, frame in zip(metas, frames, strict=True):
        buffer = frame.buffer if hasattr(frame, "buffer") else frame
        out[meta.name] = np.frombuffer(buffer, dtype=np.dtype(meta.dtype)).reshape(meta.shape)
    return out
