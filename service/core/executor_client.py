"""A front-end's handle on the executor process: the same methods as `LocalExecutor`, over ZeroMQ.

The catalog is a mirror of the executor's, rebuilt from the snapshots it publishes, so a model
switch reaches every front-end within one publish interval. Each ready version's `batcher` is a
`RemoteBatcher` that sends the request's tensors to the executor and waits for the reply.

Every inference reply says how long the model's queue will still refuse a row (`Batcher.refusing_for`);
the front-end refuses from requests' heads meanwhile, at most `REFUSING_HOLD_S` past the reply (a
request then goes through and brings the next word). Without this, with several workers every
refused request was read, decoded and sent to the executor to be refused there.

If the executor process dies, the DEALER socket reports the disconnection at once: the front-end
turns not-ready, every request waiting on the executor gets 503 (never hangs), and new ones get 503
until the restarted executor has loaded its models again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import zmq
import zmq.asyncio

from service import errors
from service.core import wire
from service.core.batching import BatchResult
from service.core.catalog import Catalog, Model
from service.core.wire import Address
from service.errors import ModelNotReady
from service.observability import tracing
from service.observability.logging import request_id
from service.settings import Settings

log = logging.getLogger("neuroserve.executor")
# How long a front-end that has just connected waits for the executor's catalog before it leaves it
# to the executor's repeated snapshots.
SNAPSHOT_TIMEOUT_S = 5.0
# The longest a front-end refuses a model's requests on the word of one reply; while it does, no
# request reaches the executor to say the queue has room again.
REFUSING_HOLD_S = 0.05


def _executor_gone() -> ModelNotReady:
    return ModelNotReady("the model executor is restarting; retry shortly", headers={"Retry-After": "1"})


def raise_failure(failure: wire.Failure) -> None:
    cls = getattr(errors, failure.error, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ServiceError)):
        cls = errors.InferenceFailed
    raise cls(failure.message, headers=dict(failure.headers) or None)


class RemoteBatcher:
    """A model version's requests, sent to the executor's batcher for it."""

    closing = False

    def __init__(self, client: RemoteExecutor, model: str, version: int, pinned: bool = False) -> None:
        self.client, self.model, self.version, self.pinned = client, model, version, pinned

    def pin(self) -> RemoteBatcher:
        return RemoteBatcher(self.client, self.model, self.version, pinned=True)

    async def submit(self, inputs: dict[str, Any], rows: int, deadline: float | None = None, *,
                     priority: int = 0, arrived: float | None = None) -> BatchResult:
        return await self.client.infer(self, inputs, rows, deadline, many=False, priority=priority,
                                       arrived=arrived)

    async def submit_many(self, inputs: dict[str, Any], rows: int, deadline: float | None = None, *,
                          priority: int = 0) -> BatchResult:
        return await self.client.infer(self, inputs, rows, deadline, many=True, priority=priority)

    def refusal(self, rows: int = 1, priority: int = 0) -> errors.QueueFull | None:
        """A refusal while the executor's last reply for this model said its queue refuses a row of
        class 0 (it decides everything else when the request arrives there)."""
        if priority > 0:
            return None
        return _refusing(self.client, self.model)

    def refuses(self, rows: int = 1, priority: int = 0) -> bool:
        return self.refusal(rows, priority) is not None

    def reserve(self, rows: int = 1) -> None:
        return None


def _refusing(client: RemoteExecutor, model: str) -> errors.QueueFull | None:
    until = client.refusing_until.get(model)
    if until is None:
        return None
    left = until - perf_counter()
    if left <= 0:
        return None
    return errors.QueueFull(f"the model's queue is refusing for another {left * 1000:.0f} ms",
                            headers={"Retry-After": "1"})


class RemoteExecutor:
    def __init__(self, settings: Settings, address: Address,
                 batcher: Callable[[str, int], Any] | None = None) -> None:
        self.settings = settings
        self.address = address
        # What a ready version of the mirrored catalog submits to: this executor, or a group's pick.
        self._batcher = batcher or (lambda model, version: RemoteBatcher(self, model, version))
        self.catalog = Catalog(settings.model_repository)
        self.connected = False
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[wire.Reply, list[Any]]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loaded = asyncio.Event()
        self._applied: bytes | None = None  # the published snapshot `catalog` was built from
        # perf_counter() until which a model's queue refuses rows of class 0, from the last reply.
        self.refusing_until: dict[str, float] = {}

    async def start(self) -> None:
        """Connect (the executor may not be up yet: ZeroMQ connects when it is)."""
        self.context = zmq.asyncio.Context()
        self.dealer = self.context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        # Queue nothing for an executor that is not connected: a request then fails at once.
        self.dealer.setsockopt(zmq.IMMEDIATE, 1)
        self.dealer.setsockopt(zmq.SNDHWM, 0)
        self.dealer.setsockopt(zmq.RCVHWM, 0)
        self.dealer.setsockopt(zmq.RECONNECT_IVL, 50)
        monitor = self.dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.dealer.connect(self.address.requests)
        self.events = self.context.socket(zmq.SUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.setsockopt(zmq.SUBSCRIBE, b"")
        self.events.setsockopt(zmq.RECONNECT_IVL, 50)
        self.events.connect(self.address.events)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._replies()), loop.create_task(self._snapshots()),
                       loop.create_task(self._connection(monitor))]

    async def wait_loaded(self) -> None:
        """Until the executor has loaded every model once (readiness then follows the catalog)."""
        await self._loaded.wait()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._fail_pending()
        self.context.destroy(linger=0)  # every socket, the connection monitor's included

    # -- requests -----------------------------------------------------------------------------------

    async def infer(self, target: RemoteBatcher, inputs: dict[str, Any], rows: int, deadline: float | None,
                    *, many: bool, priority: int = 0, arrived: float | None = None) -> BatchResult:
        if not self.connected:
            raise _executor_gone()
        metas, frames = wire.tensors(inputs)
        now = perf_counter()
        timeout = -1.0 if deadline is None else max(0.0, deadline - now)
        trace = tracing.current.get() if tracing.enabled else None
        message = wire.Infer(0, target.model, target.version, target.pinned, many, rows, timeout,
                             request_id.get(), metas, traced=trace is not None, priority=priority,
                             arrived=-1.0 if arrived is None else arrived)
        reply, out = await self._call(message, frames, check=False)
        if reply.refusing_s > 0:
            self.refusing_until[target.model] = perf_counter() + min(reply.refusing_s, REFUSING_HOLD_S)
        else:
            self.refusing_until.pop(target.model, None)
        if reply.failure is not None:
            raise_failure(reply.failure)
        if trace is not None:
            tracing.enqueued(trace, now)
            for enqueued, start, end, failed, attributes in reply.batches:
                tracing.batch_computed([(trace, enqueued)], start, end, failed, attributes)
        return BatchResult(wire.arrays(reply.outputs, out), reply.queue_s, reply.compute_s, reply.batch_rows,
                           reply.calls, reply.version)

    async def load(self, name: str) -> Model:
        await self._apply(await self._control("load", name))
        return self.catalog.model(name)

    async def unload(self, name: str) -> None:
        await self._apply(await self._control("unload", name))

    async def statistics(self, name: str | None, version: str | None) -> list[dict[str, Any]]:
        return await self._control("statistics", name, version)

    async def _control(self, op: str, model: str | None = None, version: str | None = None) -> Any:
        if not self.connected:
            raise _executor_gone()
        reply, _ = await self._call(wire.Control(0, op, model, version), [])
        return reply.body

    async def _call(self, message: wire.Infer | wire.Control, frames: list[Any],
                    check: bool = True) -> tuple[wire.Reply, list[Any]]:
        """Send `message` and wait for its reply; `check`: raise the failure it carries."""
        message.id = next(self._ids)
        future: asyncio.Future[tuple[wire.Reply, list[Any]]] = asyncio.get_running_loop().create_future()
        self._pending[message.id] = future
        try:
            try:
                await self.dealer.send_multipart([wire.encode(message), *frames], flags=zmq.NOBLOCK,
                                                 copy=not wire.zero_copy(frames))
            except zmq.Again:
                raise _executor_gone() from None
            reply, out = await future
        finally:
            self._pending.pop(message.id, None)
        if check and reply.failure is not None:
            raise_failure(reply.failure)
        return reply, out

    async def _replies(self) -> None:
        while True:
            frames = await self.dealer.recv_multipart(copy=False)
            try:
                reply = wire.decode_reply(frames[0].buffer)
            except Exception as e:
                log.error("undecodable reply from the executor: %s", e)
                continue
            future = self._pending.get(reply.id)
            if future is not None and not future.done():
                future.set_result((reply, frames[1:]))

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(_executor_gone())

    # -- catalog --------------------------------------------------------------------------------------

    async def _snapshots(self) -> None:
        while True:
            data = await self.events.recv()
            # The executor repeats its catalog every second (`REPUBLISH_S`); only what differs from
            # the catalog applied last is built again.
            if data != self._applied:
                await self._apply(wire.decode_snapshot(data))
                self._applied = data
            elif not self.catalog.loading and self.connected:
                self._loaded.set()

    async def _apply(self, snapshot: dict[str, Any]) -> None:
        self.catalog = Catalog.from_snapshot(
            Path(self.settings.model_repository), snapshot, self._batcher,
            self.settings.max_text_chars, previous=self.catalog)
        self._applied = None
        if not self.catalog.loading and self.connected:
            self._loaded.set()

    async def _connection(self, monitor: zmq.asyncio.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            event = await recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                log.info("connected to the model executor")
                try:
                    await self._apply(await asyncio.wait_for(self._control("snapshot"), SNAPSHOT_TIMEOUT_S))
                except errors.ServiceError as e:
                    log.warning("no catalog from the executor yet: %s", e.message)
                except TimeoutError:  # the executor's next repeated snapshot will do
                    log.warning("no catalog from the executor yet: no answer in %s s", SNAPSHOT_TIMEOUT_S)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                if self.connected:
                    log.error("the model executor went away; answering 503 until it is back")
                self.connected = False
                self.catalog.loading = True  # not ready until the executor has loaded again
                self._applied = None
                self._fail_pending()


class GroupBatcher(RemoteBatcher):
    """A model version served by every executor of a group: each request goes to the least busy."""

    def __init__(self, group: ExecutorGroup, model: str, version: int, pinned: bool = False) -> None:
        self.group, self.model, self.version, self.pinned = group, model, version, pinned

    @property
    def client(self) -> RemoteExecutor:  # type: ignore[override]
        return self.group.pick()

    def pin(self) -> GroupBatcher:
        return GroupBatcher(self.group, self.model, self.version, pinned=True)

    def refusal(self, rows: int = 1, priority: int = 0) -> errors.QueueFull | None:
        """A refusal only while every executor of the group refuses: the request goes to any."""
        if priority > 0:
            return None
        refusals = [_refusing(member, self.model) for member in self.group.members]
        return refusals[0] if all(refusals) else None


class ExecutorGroup:
    """One executor per GPU (`--gpus 0,1`), each with every model: the same methods as one.

    The catalog is the first ready executor's (all load the same repository); the group is ready
    when every executor is; model changes go to each in turn; statistics are summed."""

    def __init__(self, settings: Settings, addresses: list[Address]) -> None:
        self.members = [RemoteExecutor(settings, address, lambda m, v: GroupBatcher(self, m, v))
                        for address in addresses]
        self._turn = 0

    @property
    def catalog(self) -> Catalog:
        """The first ready executor's: while one restarts, the others' say what is served."""
        for m in self.members:
            if m.connected and not m.catalog.loading:
                return m.catalog
        return self.members[0].catalog

    @property
    def connected(self) -> bool:
        return all(m.connected and not m.catalog.loading for m in self.members)

    def pick(self) -> RemoteExecutor:
        """The ready executor with the fewest requests waiting on it (taking turns among equals)."""
        self._turn = (self._turn + 1) % len(self.members)
        order = self.members[self._turn:] + self.members[:self._turn]
        live = [m for m in order if m.connected and not m.catalog.loading]
        if not live:
            raise _executor_gone()
        return min(live, key=lambda m: len(m._pending))

    async def start(self) -> None:
        for m in self.members:
            await m.start()

    async def wait_loaded(self) -> None:
        await asyncio.gather(*(m.wait_loaded() for m in self.members))

    async def load(self, name: str) -> Model:
        for m in self.members:
            model = await m.load(name)
        return model

    async def unload(self, name: str) -> None:
        for m in self.members:
            await m.unload(name)

    async def statistics(self, name: str | None, version: str | None) -> list[dict[str, Any]]:
        docs = await asyncio.gather(*(m.statistics(name, version) for m in self.members))
        return merge_statistics(docs)

    async def close(self) -> None:
        for m in self.members:
            await m.close()


def merge_statistics(per_executor: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Triton statistics of the same model versions from several executors, summed."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for docs in per_executor:
        for doc in docs:
            key = (doc["name"], doc["version"])
            merged[key] = _add(merged[key], doc) if key in merged else doc
    return list(merged.values())


def _add(a: Any, b: Any, key: str = "") -> Any:
    if isinstance(a, dict):
        return {k: _add(v, b[k], k) if k in b else v for k, v in a.items()} | {
            k: v for k, v in b.items() if k not in a}
    if isinstance(a, list):  # batch_stats: one entry per batch size
        by_size = {e["batch_size"]: e for e in a}
        for e in b:
            size = e["batch_size"]
            by_size[size] = _add(by_size[size], e) if size in by_size else e
        return [by_size[size] for size in sorted(by_size)]
    if key == "last_inference":
        return max(a, b)
    if key in ("batch_size", "name", "version") or isinstance(a, bool) or not isinstance(a, int):
        return a
    return a + b
