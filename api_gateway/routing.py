"""Where a model's requests may go: the controller's view of workers, cached, and the count of
requests in flight on each, which the routing policy (controller/dispatch.py) weighs.

The view (GET {controller}/workers) is fetched every `refresh_interval` seconds in the
background, and at once (at most every `min_refresh_gap` s, one fetch shared by all waiting
requests) when a request names a model the view lacks or a worker fails. Only pagedserve
workers that accept requests are routed to: they serve OpenAI's /v1 routes themselves. If the
controller cannot be reached the last view is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from pagedserve.controller.dispatch import DECODE_TOKEN_COST, REQUEST_TOKENS
from pagedserve.protocol.openai import ModelCard
from pagedserve.protocol.registry import WorkerInfo, WorkersResponse, WorkerView

logger = logging.getLogger(__name__)


class RoutingTable:
    def __init__(
        self,
        client: httpx.AsyncClient,
        controller_url: str,
        refresh_interval: float,
        timeout: float,
        min_refresh_gap: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.controller_url = controller_url
        self.refresh_interval = refresh_interval
        self.timeout = timeout
        self.min_refresh_gap = min_refresh_gap
        self.clock = clock
        self.controller_ok = False
        self.on_change: Callable[[set[str]], None] | None = None  # worker ids now in the view
        self._by_model: dict[str, list[WorkerView]] = {}
        self._fingerprint: tuple = ()
        self._refreshed_at = float("-inf")
        self._inflight: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None

    # -- reading the view --------------------------------------------------------------------

    def workers(self, model: str) -> list[WorkerView]:
        return self._by_model.get(model, [])

    def model_names(self) -> list[str]:
        return sorted(self._by_model)

    def models(self) -> list[ModelCard]:
        cards = []
        for name in self.model_names():
            workers = self._by_model[name]
            lengths = [w.context_length for w in workers if w.context_length]
            cards.append(
                ModelCard(
                    id=name,
                    created=int(min(w.registered_at for w in workers)),
                    owned_by="pagedserve",
                    root=name,
                    max_model_len=min(lengths) if lengths else None,
                )
            )
        return cards

    # -- keeping it fresh --------------------------------------------------------------------

    async def refresh(self) -> None:
        """Fetch the controller's view now; on failure keep the last one."""
        self._refreshed_at = self.clock()
        try:
            r = await self.client.get(self.controller_url + "/workers", timeout=self.timeout)
            r.raise_for_status()
            view = WorkersResponse.model_validate_json(r.content)
        except (httpx.HTTPError, ValueError) as e:
            if self.controller_ok:
                logger.warning("controller unreachable (%s); keeping the last routing view", e)
            self.controller_ok = False
            return
        self.controller_ok = True
        self._install(view.workers)

    def _install(self, workers: list[WorkerView]) -> None:
        usable = [w for w in workers if w.kind == "pagedserve" and w.accepting]
        by_model: dict[str, list[WorkerView]] = {}
        for w in sorted(usable, key=lambda w: w.worker_id):
            for name in w.model_names:
                by_model.setdefault(name, []).append(w)
        fingerprint = tuple(
            (w.worker_id, w.worker_name, tuple(w.model_names), w.context_length) for w in usable
        )
        self._by_model = by_model
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            logger.info(
                "routing view changed: %s",
                {m: [w.worker_name for w in ws] for m, ws in by_model.items()} or "no workers",
            )
            if self.on_change is not None:
                self.on_change({w.worker_id for w in usable})

    async def refresh_soon(self) -> None:
        """Refresh unless one ran within `min_refresh_gap` s; concurrent callers share one."""
        if self._inflight is None:
            if self.clock() - self._refreshed_at < self.min_refresh_gap:
                return
            self._inflight = asyncio.ensure_future(self.refresh())
            self._inflight.add_done_callback(lambda _: setattr(self, "_inflight", None))
        await asyncio.shield(self._inflight)

    async def _run(self) -> None:
        while True:
            if self.clock() - self._refreshed_at >= self.refresh_interval * 0.5:
                await self.refresh()
            await asyncio.sleep(self.refresh_interval)

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="routing-refresh")

    async def stop(self) -> None:
        for task in (self._loop, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


@dataclass
class Ticket:
    """One request in flight on a worker."""

    worker_id: str
    prefill_tokens: int  # prompt tokens it still has to prefill (0 once its first token came)
    work: float  # all it still costs the worker, in prompt tokens: prefill, then decode
    ended: bool = False


class InFlight:
    """The requests this gateway has in flight on each worker, and the work they still ask of
    it, in prompt tokens: the prompt tokens not cached there until the first token comes back,
    and DECODE_TOKEN_COST per token of max_tokens until the end. This is the live part of the
    load that its routing policy weighs (controller/dispatch.py).

    Counting work rather than requests matters for time to first token. Requests that began
    together tend to end together; counting requests alone sends the next ones all to the worker
    that just emptied, to be prefilled there one after another while the other only decodes."""

    def __init__(self) -> None:
        self.outstanding: Counter[str] = Counter()
        self.work: Counter[str] = Counter()

    def load(self, w: WorkerInfo) -> float:
        """In requests (REQUEST_TOKENS of work each): the work of ours in flight there (exact,
        live) plus its waiting queue at its last report (other gateways' and clients')."""
        return self.work[w.worker_id] / REQUEST_TOKENS + w.waiting

    def begin(self, worker_id: str, prefill_tokens: int = 0, decode_tokens: int = 0) -> Ticket:
        work = prefill_tokens + DECODE_TOKEN_COST * decode_tokens
        self.outstanding[worker_id] += 1
        self.work[worker_id] += work
        return Ticket(worker_id, prefill_tokens, work)

    def first_token(self, ticket: Ticket) -> None:
        """Its prefill is done (idempotent)."""
        self._less(ticket, ticket.prefill_tokens)
        ticket.prefill_tokens = 0

    def end(self, ticket: Ticket) -> None:
        """It is over (idempotent)."""
        if ticket.ended:
            return
        ticket.ended = True
        self._less(ticket, ticket.work)
        self.outstanding[ticket.worker_id] -= 1
        if self.outstanding[ticket.worker_id] <= 0:
            del self.outstanding[ticket.worker_id]

    def _less(self, ticket: Ticket, work: float) -> None:
        if work:
            ticket.work -= work
            self.work[ticket.worker_id] -= work
            if self.work[ticket.worker_id] <= 1e-9:
                del self.work[ticket.worker_id]
