"""The worker's side of the controller protocol: register, heartbeat, say goodbye.

A heartbeat carries the worker's load (queue length, running and waiting requests, KV use)
and state (ready or draining). When the controller answers that it does not know the worker
(it restarted, or expired the worker), the worker registers again at once. A controller that
cannot be reached is retried every interval; the worker keeps serving meanwhile. The control
token, when there is one, rides on `client` (its default headers: worker/app.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx

from pagedserve.protocol.fastchat import WorkerStatus
from pagedserve.protocol.registry import HeartbeatRequest, RegisterWorkerRequest

logger = logging.getLogger(__name__)


class ControllerLink:
    def __init__(
        self,
        controller_address: str,
        worker_address: str,
        status: Callable[[], WorkerStatus],
        client: httpx.AsyncClient,
        interval: float,
        timeout: float = 5.0,
    ) -> None:
        self.controller = controller_address
        self.address = worker_address
        self.status = status
        self.client = client
        self.interval = interval
        self.timeout = min(timeout, max(interval, 1.0))
        self.registered = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="controller-link")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=self.timeout + 1)
            except asyncio.TimeoutError:
                self._task.cancel()

    async def register(self) -> bool:
        body = RegisterWorkerRequest(
            worker_name=self.address, check_heart_beat=True, worker_status=self.status()
        )
        try:
            r = await self.client.post(
                self.controller + "/register_worker",
                json=body.model_dump(exclude_none=True),
                timeout=self.timeout,
            )
        except httpx.HTTPError as e:
            logger.warning("cannot register with controller %s: %s", self.controller, e)
            return False
        if r.status_code != 200:
            logger.error(
                "controller %s refused registration (%s): %s",
                self.controller,
                r.status_code,
                r.text,
            )
            return False
        self.registered = True
        logger.info("registered with controller %s as %s", self.controller, self.address)
        return True

    async def heartbeat(self) -> None:
        """One heartbeat; registers again if the controller does not know this worker."""
        s = self.status()
        body = HeartbeatRequest(
            worker_name=self.address,
            queue_length=s.queue_length,
            worker_id=s.worker_id,
            running=s.running,
            waiting=s.waiting,
            kv_usage=s.kv_usage,
            state=s.state,
        )
        try:
            r = await self.client.post(
                self.controller + "/receive_heart_beat",
                json=body.model_dump(exclude_none=True),
                timeout=self.timeout,
            )
            exist = r.json()["exist"] if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError) as e:
            logger.warning("heartbeat to %s failed: %s", self.controller, e)
            return
        if exist is False:
            logger.info(
                "controller %s does not know this worker: registering again", self.controller
            )
            self.registered = False
            await self.register()

    async def unregister(self) -> None:
        try:
            await self.client.post(
                self.controller + "/unregister_worker",
                json={"worker_name": self.address},
                timeout=self.timeout,
            )
        except httpx.HTTPError as e:
            logger.warning("cannot unregister from %s: %s", self.controller, e)

    async def _run(self) -> None:
        while not self._stop.is_set():
            if self.registered:
                await self.heartbeat()
            else:
                await self.register()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval)
