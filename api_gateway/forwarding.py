"""Fail-over: send a request to one of its model's workers, and to another if that one fails
before the first byte (at most `max_retries` more, within the total timeout). 4xx answers end
it at once and count as the worker being healthy; failures feed the worker's circuit breaker,
which keeps a failing worker out of rotation for a while.

A retry spends the retry budget only when the failed attempt may still be at work, or its
worker said it is overloaded (a timeout, a 5xx): retrying those elsewhere is what multiplies
the load on the workers left. An attempt whose connection failed or was lost before the first
byte (a worker killed, or not yet dropped from the registry) left no work behind: its retry
moves the request rather than doubling it, so it is never refused for want of budget (only
`max_retries` and the circuit breakers bound it). Without this, the requests queued on a
worker that dies, and those sent to it before the registry drops it, fail with a 502 once
they outnumber the budget, with a healthy worker beside it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import httpx

from pagedserve.api_gateway.circuit_breaker import CircuitBreakers
from pagedserve.api_gateway.errors import GatewayError
from pagedserve.api_gateway.metrics import GatewayMetrics
from pagedserve.api_gateway.retry_budget import RetryBudget
from pagedserve.api_gateway.routing import InFlight, RoutingTable, Ticket
from pagedserve.api_gateway.upstream import (
    Answer,
    OpenStream,
    Refusal,
    UpstreamFailure,
    send_once,
)
from pagedserve.controller.dispatch import Route, RouteRequest, RoutingPolicy
from pagedserve.controller.prefix_index import CHARS_PER_TOKEN
from pagedserve.protocol.registry import WorkerView

logger = logging.getLogger(__name__)


@dataclass
class Forwarded:
    route: Route
    outcome: Answer | OpenStream | Refusal
    retries: int
    ticket: Ticket | None = None  # an OpenStream's place in the in-flight count, till done()

    @property
    def worker(self) -> WorkerView:
        return self.route.worker  # type: ignore[return-value]  # the table's WorkerViews


class Forwarder:
    def __init__(
        self,
        client: httpx.AsyncClient,
        table: RoutingTable,
        policy: RoutingPolicy,
        in_flight: InFlight,
        breakers: CircuitBreakers,
        budget: RetryBudget,
        metrics: GatewayMetrics,
        max_retries: int,
        first_token_timeout: float,
    ) -> None:
        self.client = client
        self.table = table
        self.policy = policy
        self.in_flight = in_flight
        self.breakers = breakers
        self.budget = budget
        self.metrics = metrics
        self.max_retries = max_retries
        self.first_token_timeout = first_token_timeout

    async def forward(
        self,
        request: RouteRequest,
        path: str,
        body: bytes,
        headers: dict[str, str],
        stream: bool,
        deadline: float,
        exclude: set[str] | frozenset[str] = frozenset(),
    ) -> Forwarded:
        """The first worker's answer that is not a failure. An OpenStream holds the worker in
        the in-flight count until `done(forwarded)` is called."""
        model = request.model
        tried = set(exclude)
        failure: UpstreamFailure | None = None
        self.budget.record_request()
        for attempt in range(1 + self.max_retries):
            if attempt and (time.monotonic() >= deadline or not self._may_retry(failure)):
                break
            route = self._pick(request, tried)
            if route is None:
                break
            worker = route.worker
            if failure is not None:
                self.metrics.retries.labels(model, failure.reason).inc()
            tried.add(worker.worker_id)
            breaker = self.breakers[worker.worker_id]
            breaker.begin()
            ticket = self.in_flight.begin(
                worker.worker_id,
                _uncached_tokens(request, route),
                request.max_tokens or DEFAULT_ANSWER_TOKENS,
            )
            first_byte = min(deadline, time.monotonic() + self.first_token_timeout)
            try:
                outcome = await send_once(
                    self.client,
                    worker.worker_name + path,
                    body,
                    headers,
                    stream=stream,
                    first_byte_deadline=first_byte,
                    deadline=deadline,
                )
            except UpstreamFailure as e:
                self.in_flight.end(ticket)
                failure = e
                self._failed(worker, e)
                if e.reason == "connect":
                    await self.table.refresh_soon()
                continue
            except BaseException:  # cancelled (client gone): no verdict on the worker
                self.in_flight.end(ticket)
                breaker.cancel()
                raise
            breaker.success()
            if not isinstance(outcome, OpenStream):
                self.in_flight.end(ticket)
            return Forwarded(route, outcome, attempt, ticket)
        raise self._exhausted(model, failure)

    def _may_retry(self, failure: UpstreamFailure | None) -> bool:
        """Whether this failure may be retried: free when it left no work behind (see the
        module's doc), else as the retry budget allows."""
        if failure is not None and failure.reason in ("connect", "broken"):
            return True
        return self.budget.try_spend()

    def first_token(self, forwarded: Forwarded) -> None:
        if forwarded.ticket is not None:
            self.in_flight.first_token(forwarded.ticket)

    def done(self, forwarded: Forwarded) -> None:
        if forwarded.ticket is not None:
            self.in_flight.end(forwarded.ticket)

    async def stream_failed(self, worker: WorkerView, reason: str) -> None:
        """A worker's stream broke after its first byte: count it against the worker, and look
        for news of it (it may be gone) before another is chosen."""
        self._failed(worker, UpstreamFailure("broken", reason))
        await self.table.refresh_soon()

    def _pick(self, request: RouteRequest, tried: set[str]) -> Route | None:
        candidates = [
            w
            for w in self.table.workers(request.model)
            if w.worker_id not in tried and self.breakers[w.worker_id].available()
        ]
        return self.policy.select(candidates, request)

    def _failed(self, worker: WorkerView, e: UpstreamFailure) -> None:
        self.metrics.worker_failures.labels(e.reason).inc()
        logger.warning("worker %s failed: %s", worker.worker_name, e.message)
        if self.breakers[worker.worker_id].failure():
            logger.warning(
                "circuit opened for worker %s: skipped for %.0fs",
                worker.worker_name,
                self.breakers.cooldown,
            )

    def _exhausted(self, model: str, failure: UpstreamFailure | None) -> GatewayError:
        if failure is None:
            waits = [self.breakers[w.worker_id].retry_in() for w in self.table.workers(model)]
            return GatewayError(
                503,
                f"No worker of model {model!r} is available right now; please retry shortly.",
                type="server_error",
                code="no_worker_available",
                retry_after=max(1.0, min(waits, default=1.0)),
            )
        if failure.reason == "timeout":
            return GatewayError(
                504, f"The model {model!r} timed out: {failure.message}.", type="timeout"
            )
        if failure.status == 503:
            return GatewayError(
                503,
                f"The model {model!r} is unavailable: {failure.message}",
                type="server_error",
                code="worker_unavailable",
                retry_after=1,
            )
        return GatewayError(
            502,
            f"The model {model!r} failed: {failure.message}",
            type="server_error",
            code="upstream_error",
        )


# An answer's length where the request does not bound it.
DEFAULT_ANSWER_TOKENS = 256


def _uncached_tokens(request: RouteRequest, route: Route) -> int:
    """The prompt tokens the worker has to prefill: all but those it probably has cached (text
    at about 4 characters a token)."""
    prompt = request.prompt
    if prompt is None:
        return 0
    tokens = len(prompt) // CHARS_PER_TOKEN if isinstance(prompt, str) else len(prompt)
    return max(0, tokens - route.cached_tokens)
