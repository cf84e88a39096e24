"""The controller's logic: the registry of workers over a store, and dispatch over a policy.

Routes (app.py) only parse, call one method here and format. Nothing here keeps global
state: everything lives in the store, so several replicas sharing a Redis store agree.

The request path does no work proportional to the number of workers: dispatch and
/list_models read the store's per-model view (`store.view`, worker_index.py) without copying
or listing it, and the policy looks at O(1) of a large pool. Only the operator's routes
(/workers, drain, refresh) and the monitor's upkeep go over every worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from pagedserve.controller.config import ControllerConfig
from pagedserve.controller.dispatch import Route, RouteRequest, RoutingPolicy
from pagedserve.controller.metrics import ControllerMetrics
from pagedserve.controller.store import WorkerStore
from pagedserve.protocol.fastchat import ErrorCode, WorkerStatus
from pagedserve.protocol.registry import (
    HeartbeatRequest,
    RegisterWorkerRequest,
    WorkerInfo,
    WorkerView,
)

logger = logging.getLogger(__name__)


def default_worker_id(worker_name: str) -> str:
    """A stable id for a worker that did not send one (FastChat workers): from its address."""
    return hashlib.sha1(worker_name.encode()).hexdigest()[:12]


class WorkerUnreachable(RuntimeError):
    """A worker did not answer (registration without worker_status, proxying)."""


class Controller:
    def __init__(
        self,
        config: ControllerConfig,
        store: WorkerStore,
        policy: RoutingPolicy,
        client: httpx.AsyncClient,
        metrics: ControllerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.policy = policy
        self.client = client
        self.metrics = metrics
        self.clock = clock
        self.started = clock()

    # -- registration and heartbeats --------------------------------------------------------

    async def register(self, req: RegisterWorkerRequest) -> WorkerInfo:
        status = req.worker_status or await self.fetch_status(req.worker_name)
        now = self.clock()
        info = WorkerInfo(
            worker_name=req.worker_name,
            worker_id=status.worker_id or default_worker_id(req.worker_name),
            kind="pagedserve" if status.worker_id else "fastchat",
            model_names=list(dict.fromkeys(status.model_names)),
            speed=status.speed,
            queue_length=status.queue_length,
            running=status.running,
            waiting=status.waiting,
            kv_usage=status.kv_usage,
            state=status.state,
            context_length=status.context_length,
            check_heart_beat=req.check_heart_beat,
            multimodal=req.multimodal,
            registered_at=now,
            last_heart_beat=now,
        )
        await self.store.put(info)
        self.metrics.registrations.inc()
        logger.info(
            "registered worker %s (%s) serving %s",
            info.worker_name,
            info.worker_id,
            info.model_names,
        )
        return info

    async def fetch_status(self, worker_name: str) -> WorkerStatus:
        """FastChat registers without a status and asks the worker; so do we."""
        try:
            r = await self.client.post(
                worker_name + "/worker_get_status", timeout=self.config.health_check_timeout
            )
            r.raise_for_status()
            return WorkerStatus.model_validate(r.json())
        except (httpx.HTTPError, ValueError) as e:
            raise WorkerUnreachable(
                f"no worker_status was sent and {worker_name}/worker_get_status failed: {e}"
            ) from e

    async def heartbeat(self, req: HeartbeatRequest) -> bool:
        """Record the load a worker reports; False tells it to register again: it is unknown,
        or another process now answers at its address (a restarted worker, whose models and id
        must replace the old ones)."""
        self.store.raise_if_down()
        fields: dict[str, Any] = {
            "queue_length": req.queue_length,
            "last_heart_beat": self.clock(),
            "dispatched": 0,
        }
        for name in ("running", "waiting", "kv_usage", "state"):
            value = getattr(req, name)
            if value is not None:
                fields[name] = value
        exist = await self.store.record_heartbeat(req.worker_name, fields, req.worker_id)
        self.metrics.heartbeats.labels(str(exist).lower()).inc()
        if not exist:
            logger.info(
                "heartbeat from an unknown or replaced worker %s: asking it to register",
                req.worker_name,
            )
        return exist

    async def unregister(self, worker_name: str, reason: str = "unregistered") -> bool:
        removed = await self.store.remove(worker_name)
        if removed:
            self.metrics.removals.labels(reason).inc()
            logger.info("removed worker %s (%s)", worker_name, reason)
        return removed

    async def drain(self, worker_id: str) -> WorkerInfo | None:
        """Send no new requests to a worker (operator's request); None if the id is unknown."""
        for w in await self.store.list():
            if worker_id in (w.worker_id, w.worker_name):
                await self.store.update(w.worker_name, {"drain_requested": True})
                return w.model_copy(update={"drain_requested": True})
        return None

    # -- queries ----------------------------------------------------------------------------

    async def list_models(self, multimodal: bool | None = None) -> list[str]:
        """Models with at least one worker accepting requests (FastChat lists every model)."""
        self.store.raise_if_down()  # a store that is down answers 503, as dispatch does
        return self.store.view.models(multimodal)

    async def workers(self) -> list[WorkerView]:
        now = self.clock()
        return [
            WorkerView(
                **w.model_dump(),
                status=w.effective_state,
                seconds_since_heart_beat=round(max(0.0, now - w.last_heart_beat), 3),
            )
            for w in await self.store.list()
        ]

    async def aggregate_status(self) -> WorkerStatus | dict[str, Any]:
        """FastChat's controller-as-a-worker status: models, total speed and queue."""
        workers = [w for w in self.store.view.workers() if w.accepting]
        return {
            "model_names": sorted({m for w in workers for m in w.model_names}),
            "speed": sum(w.speed for w in workers),
            "queue_length": sum(w.queue_length + w.dispatched for w in workers),
        }

    # -- dispatch ---------------------------------------------------------------------------

    async def select(
        self, request: RouteRequest, exclude: set[str] | frozenset[str] = frozenset()
    ) -> Route | None:
        self.store.raise_if_down()
        model = request.model
        candidates: Sequence[WorkerInfo] = self.store.view.candidates(model)
        if exclude:  # only after a worker could not be reached (open_stream's retries)
            candidates = [w for w in candidates if w.worker_name not in exclude]
        if 0 < len(candidates) <= self.policy.exact_up_to:
            # a small pool is compared exactly: with its load as the store has it now (Redis:
            # one round trip); a large one is sampled from the view, at most one sweep old
            await self.store.refresh_load(candidates)
        route = self.policy.select(candidates, request)
        if route is None:
            self.metrics.dispatches.labels(model, "no_worker").inc()
            return None
        await self.store.incr_dispatched(route.worker.worker_name)
        self.metrics.dispatches.labels(model, "ok").inc()
        if request.prompt is not None:
            self.metrics.prefix_routes.labels(model, "hit" if route.cached_tokens else "miss").inc()
        return route

    async def worker_address(self, request: RouteRequest) -> tuple[dict[str, Any], Route | None]:
        """/get_worker_address's answer and the route behind it. FastChat's clients expect 200
        and an empty address when no worker serves the model; the answer then says why."""
        route = await self.select(request)
        if route is not None:
            return {"address": route.worker.worker_name}, route
        models = await self.list_models()
        text = f"no worker serves model {request.model!r}; models: {models}"
        return {
            "address": "",
            "error_code": int(ErrorCode.CONTROLLER_NO_WORKER),
            "text": text,
        }, None

    async def open_stream(self, model: str, params: dict[str, Any]) -> httpx.Response | None:
        """Open /worker_generate_stream on a worker of `model`; on a connection failure (before
        any byte was sent) try the next worker. None when no worker serves the model."""
        tried: set[str] = set()
        last_error: Exception | None = None
        prompt = params.get("prompt")
        request = RouteRequest(model, prompt if isinstance(prompt, str) else None)
        for _ in range(8):  # bounded: a model rarely has more replicas than this to try
            route = await self.select(request, exclude=tried)
            if route is None:
                break
            worker = route.worker
            tried.add(worker.worker_name)
            request = self.client.build_request(
                "POST",
                worker.worker_name + "/worker_generate_stream",
                json=params,
                timeout=httpx.Timeout(self.config.worker_api_timeout, connect=5.0),
            )
            try:
                return await self.client.send(request, stream=True)
            except httpx.TransportError as e:
                logger.warning("worker %s unreachable, trying another: %s", worker.worker_name, e)
                last_error = e
        if last_error is not None:
            raise WorkerUnreachable(f"no worker of {model!r} could be reached: {last_error}")
        return None

    # -- upkeep (run by the monitor) --------------------------------------------------------

    async def expire(self) -> list[str]:
        """Remove the workers whose heartbeats stopped. The store names the candidates without
        a copy of every worker; each is read again, since the store's record is authoritative
        (another replica may have had its heartbeat). A worker's heartbeats cannot land while
        no controller is up, so a controller that comes back to a registry in Redis first gives
        every worker `heartbeat_expiration` seconds of its own life to reach it."""
        deadline = self.clock() - self.config.heartbeat_expiration
        if deadline < self.started:
            return []
        silent = await self.store.silent_since(deadline)
        expired = []
        for name in silent:
            w = await self.store.get(name)
            if w is not None and w.check_heart_beat and w.last_heart_beat < deadline:
                await self.unregister(name, reason="expired")
                expired.append(name)
        return expired

    async def health_check(self, w: WorkerInfo) -> None:
        """One active check: GET /ready (pagedserve) or POST /worker_get_status (FastChat)."""
        timeout = self.config.health_check_timeout
        try:
            if w.kind == "pagedserve":
                r = await self.client.get(w.worker_name + "/ready", timeout=timeout)
                answered, ready = r.status_code in (200, 503), r.status_code == 200
            else:
                r = await self.client.post(w.worker_name + "/worker_get_status", timeout=timeout)
                answered = ready = r.status_code == 200
        except httpx.HTTPError:
            answered = ready = False
        if answered:
            await self.store.update(w.worker_name, {"ready": ready, "health_failures": 0})
            return
        failures = w.health_failures + 1
        if failures >= self.config.health_check_failure_threshold:
            await self.unregister(w.worker_name, reason="health_check")
        else:
            await self.store.update(w.worker_name, {"health_failures": failures})

    async def health_check_all(self) -> None:
        workers = [w.model_copy() for w in self.store.view.workers()]
        await asyncio.gather(*(self.health_check(w) for w in workers))

    async def refresh_all(self) -> None:
        """FastChat's /refresh_all_workers: ask every worker for its status again and drop
        those that do not answer."""

        async def refresh(w: WorkerInfo) -> None:
            try:
                status = await self.fetch_status(w.worker_name)
            except WorkerUnreachable:
                await self.unregister(w.worker_name, reason="refresh")
                return
            await self.store.update(
                w.worker_name,
                {
                    "model_names": list(dict.fromkeys(status.model_names)),
                    "speed": status.speed,
                    "queue_length": status.queue_length,
                },
            )

        await asyncio.gather(*(refresh(w) for w in await self.store.list()))
