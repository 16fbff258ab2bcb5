"""The executor: the one owner of a device's models, batching the requests of every front-end.

One interface, two placements:
- `LocalExecutor` runs in the front-end's own process (`--executor in-process`, the default with
  one worker): the routes reach the repository and its batchers directly, no IPC.
- `serve` runs a `LocalExecutor` in a process of its own (`--executor process`, the default with
  several workers) behind a ZeroMQ ROUTER socket; front-ends reach it through
  `service.core.executor_client.RemoteExecutor`, which has the same methods. It publishes the
  catalog (models, versions, states) on a PUB socket whenever it changes, so every front-end
  answers metadata, index and readiness from this one state.
Either way the batching and session code is the same: `Repository` and `Batcher`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from time import perf_counter
from typing import Any

from service import errors
from service.core import wire
from service.core.catalog import Catalog, Model
from service.core.repository import Repository
from service.observability import metrics, tracing
from service.observability.logging import request_id
from service.process import supervised
from service.settings import Settings

log = logging.getLogger("neuroserve.executor")

# How often the executor looks for catalog changes to publish (a version switching, loading).
PUBLISH_INTERVAL_S = 0.02
# The catalog is sent again this often when nothing has changed: a front-end that missed an update
# or applied an older one last (a snapshot published while it was connecting) catches up.
REPUBLISH_S = 1.0
# The ORT threads need the GIL briefly around each batch; see `service.server.app`.
GIL_SWITCH_INTERVAL_S = 0.0005


class LocalExecutor:
    """The models of this process: load, serve, reload, unload, statistics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repository = Repository(settings)
        self._poll: asyncio.Task[None] | None = None

    @property
    def catalog(self) -> Catalog:
        return self.repository

    @property
    def connected(self) -> bool:
        return True

    async def start(self) -> None:
        """Load every model of the repository (the catalog says `loading` until this returns)."""
        await self.repository.load_all()
        if self.settings.model_control_mode == "poll":
            self._poll = asyncio.create_task(self.repository.poll(self.settings.repository_poll_s))

    async def load(self, name: str) -> Model:
        return await self.repository.load(name)

    async def unload(self, name: str) -> None:
        await self.repository.unload(name)

    async def statistics(self, name: str | None, version: str | None) -> list[dict[str, Any]]:
        return self.repository.statistics(name, version)

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
        await self.repository.close()


def failure(e: BaseException) -> wire.Failure:
    if isinstance(e, errors.ServiceError):
        return wire.Failure(type(e).__name__, e.message, e.headers)
    log.exception("executor: unexpected error", exc_info=e)
    return wire.Failure("InferenceFailed", f"internal error: {e}")


class ExecutorServer:
    def __init__(self, settings: Settings, address: wire.Address) -> None:
        self.executor = LocalExecutor(settings)
        self.address = address
        self._tasks: set[asyncio.Task[None]] = set()
        self._published: Any = None
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        import zmq
        import zmq.asyncio

        context = zmq.asyncio.Context()
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, 0)  # never drop a reply: front-ends bound what they send
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.router.bind(self.address.requests)
        self.events = context.socket(zmq.PUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.bind(self.address.events)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loader = asyncio.create_task(self._load())
        publisher = asyncio.create_task(self._publish_changes())
        receiver = asyncio.create_task(self._receive())
        await self._stopping.wait()
        log.info("executor stopping: finishing admitted requests")
        receiver.cancel()
        loader.cancel()
        await self.executor.close()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        publisher.cancel()
        self.router.close(linger=1000)  # the last replies
        self.events.close()
        context.term()

    async def _load(self) -> None:
        await self.executor.start()
        gc.collect()
        gc.freeze()  # see service.server.app._freeze_heap
        log.info("executor ready", extra={"models": len(self.executor.catalog.models)})

    async def _publish_changes(self) -> None:
        sent = 0.0
        while True:
            signature = _signature(self.executor.catalog)
            if signature != self._published or perf_counter() - sent >= REPUBLISH_S:
                self._published, sent = signature, perf_counter()
                await self.events.send(wire.encode(self.executor.catalog.snapshot()))
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frames = await self.router.recv_multipart(copy=False)
            try:
                message = wire.decode_request(frames[1].buffer)
            except Exception as e:  # a front-end of another version, or a bug: say so, keep going
                log.error("executor: undecodable message: %s", e)
                continue
            task = loop.create_task(self._handle(frames[0].bytes, message, frames[2:]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, peer: bytes, message: wire.Request, frames: list[Any]) -> None:
        out: list[Any] = []
        try:
            if isinstance(message, wire.Infer):
                reply, out = await self._infer(message, frames)
            else:
                reply = wire.Reply(message.id, body=await self._control(message))
        except BaseException as e:
            reply = wire.Reply(message.id, failure=failure(e))
            if not isinstance(e, Exception):
                raise
        await self.router.send_multipart([peer, wire.encode(reply), *out], copy=not wire.zero_copy(out))

    async def _infer(self, m: wire.Infer, frames: list[Any]) -> tuple[wire.Reply, list[Any]]:
        batcher = self.executor.repository.batcher_for(m.model, m.version, m.pinned)
        inputs = wire.arrays(m.inputs, frames)
        deadline = perf_counter() + m.timeout_s if m.timeout_s >= 0 else None
        request_id.set(m.request_id)
        trace = tracing.RequestTrace(None, perf_counter()) if m.traced else None
        tracing.current.set(trace)
        try:
            if m.many:
                result = await batcher.submit_many(inputs, m.rows, deadline, priority=m.priority)
            else:
                result = await batcher.submit(inputs, m.rows, deadline, priority=m.priority,
                                              arrived=m.arrived if m.arrived >= 0 else None)
        except errors.QueueFull as e:
            return wire.Reply(m.id, failure=failure(e), refusing_s=batcher.refusing_for()), []
        metas, out = wire.tensors(result.outputs)
        batches = [(enqueued, b.start, b.end, b.failed, b.attributes)
                   for enqueued, b in trace.batches] if trace is not None else []
        return wire.Reply(m.id, version=result.version, queue_s=result.queue_s, compute_s=result.compute_s,
                          batch_rows=result.batch_rows, calls=result.calls, outputs=metas,
                          batches=batches, refusing_s=batcher.refusing_for()), out

    async def _control(self, m: wire.Control) -> Any:
        if m.op == "snapshot":
            return self.executor.catalog.snapshot()
        if m.op == "statistics":
            return await self.executor.statistics(m.model, m.version)
        if m.op == "load" and m.model is not None:
            await self.executor.load(m.model)
            return self.executor.catalog.snapshot()
        if m.op == "unload" and m.model is not None:
            await self.executor.unload(m.model)
            return self.executor.catalog.snapshot()
        raise errors.InvalidInput(f"unknown executor operation {m.op!r}")


def _signature(catalog: Catalog) -> Any:
    """What a snapshot shows, cheaply: changes when any model or version changes state."""
    return catalog.loading, tuple(
        (name, id(m), m.error, m.unloaded,
         tuple((v, mv.state, mv.reason, mv.provider) for v, mv in m.versions.items()))
        for name, m in catalog.models.items())


def serve(address: wire.Address, gpu: int | None = None) -> None:
    """The executor process: settings from the environment (see `Settings.to_environ`), on `gpu`
    when the supervisor runs one executor per GPU (`--gpus`)."""
    from service.observability import logging as service_logging

    supervised(b"neuroserve-exec")
    settings = Settings()
    if gpu is not None:
        settings = settings.model_copy(update={"cuda_device_id": gpu})
    service_logging.configure(settings.log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # The batchers record batch times for the requests a front-end traces (only those: they come
    # with a trace); the front-end builds and exports the spans. Nothing is exported from here.
    tracing.enabled = True
    metrics.worker_started()
    log.info("executor starting", extra={"pid": os.getpid(), "address": address.requests})
    try:
        import uvloop

        uvloop.run(ExecutorServer(settings, address).run())
    finally:
        metrics.worker_stopped()
