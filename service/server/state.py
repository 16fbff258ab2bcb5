"""What one front-end process holds while it serves: settings, its executor handle (the models, in
this process or in the executor's), and its lifecycle flags."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from service.core.catalog import Catalog, ModelVersion
from service.errors import ModelNotReady
from service.settings import Settings

if TYPE_CHECKING:
    from service.core.executor import LocalExecutor
    from service.core.executor_client import RemoteExecutor

log = logging.getLogger("neuroserve.state")


class ServiceState:
    def __init__(self, settings: Settings, executor: LocalExecutor | RemoteExecutor) -> None:
        self.settings = settings
        self.executor = executor
        self.draining = False
        self.active = 0  # admitted inference requests not yet answered
        self.load_task: asyncio.Task[None] | None = None

    @property
    def repository(self) -> Catalog:
        """What the executor serves (a mirror of its catalog when it runs in another process)."""
        return self.executor.catalog

    def model(self, name: str, version: str | None = None) -> ModelVersion:
        if self.draining:
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
        """Refuse new work (ready turns false, infer answers 503) and wait for admitted requests."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout_s
        log.info("draining: refusing new requests", extra={"active": self.active})
        while self.active > 0 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.active:
            log.warning("drain timeout passed with requests in flight", extra={"active": self.active})
        else:
            log.info("drained: no request in flight")
