"""Where the controller keeps its registry of workers: one interface, two stores.

`MemoryStore` (default) keeps it in the process; `RedisStore` (redis_store.py) keeps it in
Redis so that several controller replicas share one registry. Both pass the same test suite
(tests/test_controller_store.py). Workers are keyed by `worker_name`, their base URL, as in
FastChat's protocol. Every method is atomic with respect to the others.

Dispatch does not list the store: each store keeps a `WorkerIndex` (worker_index.py), the
per-model pools that the controller reads on every request without a copy or a round trip.
The memory store's index is its registry, exact at every moment. The Redis store's is a local
view: its own writes apply at once, and `refresh_view()` (run by the monitor every
`sweep_interval`, at most 1 s, and at startup) loads what other replicas wrote, so another
replica's registrations, removals and load become visible here within that interval.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from typing import Any

from pagedserve.controller.worker_index import WorkerIndex
from pagedserve.protocol.registry import WorkerInfo


class StoreError(RuntimeError):
    """The store cannot be reached (Redis down): the controller answers 503."""


class WorkerStore(abc.ABC):
    @property
    @abc.abstractmethod
    def view(self) -> WorkerIndex:
        """The per-model pools dispatch reads: uncopied, read within one synchronous step."""

    async def refresh_view(self) -> None:
        """Bring the view up to date with writes made elsewhere (other replicas)."""
        return None  # a store only this process writes has nothing to reload

    async def refresh_load(self, workers: Sequence[WorkerInfo]) -> None:
        """Reload the load fields of a few of the view's workers (a small pool about to be
        compared), so that replicas sharing the store count each other's dispatches."""
        return None

    async def silent_since(self, deadline: float) -> list[str]:
        """Workers whose last heartbeat is older than `deadline` (the store's record may be
        newer: confirm with `get` before acting)."""
        return [
            w.worker_name
            for w in self.view.workers()
            if w.check_heart_beat and w.last_heart_beat < deadline
        ]

    @abc.abstractmethod
    async def put(self, info: WorkerInfo) -> None:
        """Add a worker or replace it whole (registration)."""

    @abc.abstractmethod
    async def get(self, worker_name: str) -> WorkerInfo | None: ...

    @abc.abstractmethod
    async def list(self) -> list[WorkerInfo]:
        """Every worker, ordered by worker_name."""

    @abc.abstractmethod
    async def update(
        self, worker_name: str, fields: dict[str, Any], worker_id: str | None = None
    ) -> bool:
        """Set some fields of an existing worker; False (and nothing written) if it is unknown,
        or, when `worker_id` is given, if another worker (a restarted process) now has that
        name."""

    async def record_heartbeat(
        self, worker_name: str, fields: dict[str, Any], worker_id: str | None = None
    ) -> bool:
        """`update` for a heartbeat's fields; a store may answer from its view and write the
        fields a moment later (`flush`)."""
        return await self.update(worker_name, fields, worker_id)

    @abc.abstractmethod
    async def incr_dispatched(self, worker_name: str) -> bool:
        """Count one more request sent to the worker since its last heartbeat (a store may
        write the count a moment later: `flush`)."""

    async def flush(self) -> None:
        """Write what was answered from the view and not yet written."""
        return None  # a store that writes through has nothing waiting

    @abc.abstractmethod
    async def remove(self, worker_name: str) -> bool:
        """Forget a worker; False if it was unknown."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreError if the store cannot be used."""

    def raise_if_down(self) -> None:
        """Raise StoreError if the store failed the last time it was used (no round trip)."""
        return None  # a store in this process is never down

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""


def _checked(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - set(WorkerInfo.model_fields)
    if unknown:
        raise KeyError(f"unknown WorkerInfo fields: {sorted(unknown)}")
    return fields


class MemoryStore(WorkerStore):
    """The registry in a dict, guarded by a lock; nothing to install."""

    def __init__(self) -> None:
        self._index = WorkerIndex()
        self._lock = asyncio.Lock()

    @property
    def view(self) -> WorkerIndex:
        return self._index

    async def put(self, info: WorkerInfo) -> None:
        async with self._lock:
            self._index.put(info.model_copy(deep=True))

    async def get(self, worker_name: str) -> WorkerInfo | None:
        async with self._lock:
            info = self._index.get(worker_name)
            return info.model_copy(deep=True) if info else None

    async def list(self) -> list[WorkerInfo]:
        async with self._lock:
            workers = sorted(self._index.workers(), key=lambda w: w.worker_name)
            return [w.model_copy(deep=True) for w in workers]

    async def update(
        self, worker_name: str, fields: dict[str, Any], worker_id: str | None = None
    ) -> bool:
        _checked(fields)
        async with self._lock:
            return self._index.update(worker_name, fields, worker_id)

    async def incr_dispatched(self, worker_name: str) -> bool:
        async with self._lock:
            return self._index.incr_dispatched(worker_name)

    async def remove(self, worker_name: str) -> bool:
        async with self._lock:
            return self._index.remove(worker_name) is not None

    async def ping(self) -> None:
        return None  # always reachable

    async def close(self) -> None:
        return None  # nothing to release


def make_store(redis_url: str | None, redis_prefix: str) -> WorkerStore:
    if redis_url is None:
        return MemoryStore()
    from pagedserve.controller.redis_store import RedisStore

    return RedisStore(redis_url, prefix=redis_prefix)
