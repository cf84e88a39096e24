"""The controller's background upkeep: expire silent workers, health-check the rest."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pagedserve.controller.registry import Controller
from pagedserve.controller.store import StoreError

logger = logging.getLogger(__name__)


class Monitor:
    """One task, started and stopped by the app's lifespan.

    Every `sweep_interval` it refreshes the store's view (other replicas' writes), expires
    workers whose heartbeats stopped and refreshes the registry gauges; every `health_check_interval` (if > 0) it checks each worker once.
    """

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="controller-monitor")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=5.0)
            except asyncio.TimeoutError:
                self._task.cancel()

    async def _run(self) -> None:
        config = self.controller.config
        next_sweep = next_check = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_sweep:
                    next_sweep = now + config.sweep_interval
                    await self.controller.store.refresh_view()
                    await self.controller.expire()
                    self.controller.metrics.observe_registry(self.controller.store.view.workers())
                if config.health_check_interval > 0 and now >= next_check:
                    next_check = now + config.health_check_interval
                    await self.controller.health_check_all()
            except StoreError as e:
                logger.warning("registry upkeep skipped: %s", e)
            except Exception:  # keep the upkeep alive whatever one round hits
                logger.exception("registry upkeep failed")
            wake = next_sweep
            if config.health_check_interval > 0:
                wake = min(wake, next_check)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._stop.wait(), timeout=max(0.01, wake - time.monotonic())
                )
