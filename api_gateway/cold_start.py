"""Scale from zero: a request for a model with no worker wakes it through the supervisor and
waits for its first worker, instead of a 404.

POST {supervisor}/admin/models/{model}/wake starts the model's first replica; a 404 there means
the supervisor does not serve that model (the gateway then answers 404 as ever). Then the
routing view is refreshed until a worker of the model is in it, up to `timeout` seconds
(503 with Retry-After beyond). Concurrent requests for one sleeping model share one wake and
one wait; each waits asynchronously, so other models' requests go on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from pagedserve.api_gateway.errors import GatewayError
from pagedserve.api_gateway.routing import RoutingTable

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.5  # seconds between looks at the routing view while a model starts


class ColdStarts:
    def __init__(
        self,
        client: httpx.AsyncClient,
        table: RoutingTable,
        supervisor_url: str,
        timeout: float,
    ) -> None:
        self.client = client
        self.table = table
        self.supervisor_url = supervisor_url.rstrip("/")
        self.timeout = timeout
        self._waits: dict[str, asyncio.Task[bool]] = {}

    async def wake(self, model: str) -> bool:
        """True once `model` has a worker in the routing view; False if the supervisor does
        not serve it. GatewayError 503 if it cannot be woken or is not up in time."""
        task = self._waits.get(model)
        if task is None:
            task = asyncio.ensure_future(self._wake(model))
            self._waits[model] = task
            task.add_done_callback(lambda _: self._waits.pop(model, None))
        return await asyncio.shield(task)  # one client leaving does not end the others' wait

    async def _wake(self, model: str) -> bool:
        started = time.monotonic()
        try:
            reply = await self.client.post(
                f"{self.supervisor_url}/admin/models/{model}/wake", timeout=10.0
            )
        except httpx.HTTPError as e:
            raise self._unavailable(model, f"its supervisor cannot be reached ({e})") from None
        if reply.status_code == 404:
            return False
        if reply.status_code != 200:
            raise self._unavailable(model, f"its supervisor answered {reply.status_code}")
        logger.info("waking %s (scaled to zero)", model)
        deadline = started + self.timeout
        while time.monotonic() < deadline:
            await self.table.refresh_soon()
            if self.table.workers(model):
                logger.info("%s is up after %.1fs", model, time.monotonic() - started)
                return True
            await asyncio.sleep(POLL_INTERVAL)
        raise GatewayError(
            503,
            f"The model `{model}` is starting (it was scaled to zero) and was not ready within "
            f"{self.timeout:.0f}s. Please retry.",
            type="server_error",
            code="model_cold_start_timeout",
            retry_after=min(30.0, self.timeout),
        )

    def _unavailable(self, model: str, why: str) -> GatewayError:
        logger.warning("cannot wake %s: %s", model, why)
        return GatewayError(
            503,
            f"The model `{model}` has no worker now and could not be started. Please retry.",
            type="server_error",
            code="model_unavailable",
            retry_after=5.0,
        )
