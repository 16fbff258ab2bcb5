"""What one front-end process holds while it serves: settings, its executor handle (the models, in
this process or in the executor's), and its lifecycle flags."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from service.core.catalog import Catalog, ModelVersion
from service.errors import ModelNotReady
from service.server import listeners
from service.settings import Settings

if TYPE_CHECKING:
    from service.core.executor import LocalExecutor
    from service.core.executor_client import ExecutorGroup, RemoteExecutor

log = logging.getLogger("neuroserve.state")
LISTEN_QUEUE_DRAIN_S = 0.2  # time for the event loop to accept the connections the kernel queued


class ServiceState:
    def __init__(self, settings: Settings, executor: LocalExecutor | RemoteExecutor | ExecutorGroup) -> None:
        self.settings = settings
        self.executor = executor
        self.draining = False
        self.in_grace = False  # SIGTERM's grace period: not ready, but still serving
        self.active = 0  # admitted inference requests not yet answered
        self.load_task: asyncio.Task[None] | None = None

    @property
    def repository(self) -> Catalog:
        """What the executor serves (a mirror of its catalog when it runs in another process)."""
        return self.executor.catalog

    def model(self, name: str, version: str | None = None) -> ModelVersion:
        if self.draining and not self.in_grace:
            # Closing the connection sends the client's next attempt to another replica.
            raise ModelNotReady("server is shutting down",
                                headers={"Connection": "close", "Retry-After": "1"})
        return self.repository.get(name, version)

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return (not self.draining and self.executor.connected
                and self.repository.ready(strict=self.settings.strict_readiness))

    async def drain(self) -> None:
        """Turn not-ready, keep serving for `drain_grace_s` (load balancers move traffic away; each
        response closes its connection), then refuse new work (503) and wait for admitted requests."""
        self.draining = True
        if self.settings.drain_grace_s > 0:
            self.in_grace = True
            log.info("draining: not ready, serving for the grace period",
                     extra={"grace_s": self.settings.drain_grace_s})
            try:
                await asyncio.sleep(self.settings.drain_grace_s)
            finally:
                self.in_grace = False
        # New connections are dropped from here on; those already queued are still answered.
        if listeners.refuse_new_connections(self.settings.port):
            await asyncio.sleep(LISTEN_QUEUE_DRAIN_S)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout_s
        log.info("draining: refusing new requests", extra={"active": self.active})
        while self.active > 0 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.active:
            log.warning("drain timeout passed with requests in flight", extra={"active": self.active})
        else:
            log.info("drained: no request in flight")
