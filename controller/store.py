"""Where the controller keeps its registry of workers: one interface, two stores.

`MemoryStore` (default) keeps it in the process; `RedisStore` (redis_store.py) keeps it in
Redis so that several controller replicas share one registry. Both pass the same test suite
(tests/test_controller_store.py). Workers are keyed by `worker_name`, their base URL, as in
FastChat's protocol. Every method is atomic with respect to the others.
"""

from __future__ import annotations

import abc
import asyncio
from typing import Any

from pagedserve.controller.protocol import WorkerInfo


class StoreError(RuntimeError):
    """The store cannot be reached (Redis down): the controller answers 503."""


class WorkerStore(abc.ABC):
    @abc.abstractmethod
    async def put(self, info: WorkerInfo) -> None:
        """Add a worker or replace it whole (registration)."""

    @abc.abstractmethod
    async def get(self, worker_name: str) -> WorkerInfo | None: ...

    @abc.abstractmethod
    async def list(self) -> list[WorkerInfo]:
        """Every worker, ordered by worker_name."""

    @abc.abstractmethod
    async def update(self, worker_name: str, fields: dict[str, Any]) -> bool:
        """Set some fields of an existing worker; False (and nothing written) if it is unknown."""

    @abc.abstractmethod
    async def incr_dispatched(self, worker_name: str) -> bool:
        """Count one more request sent to the worker since its last heartbeat."""

    @abc.abstractmethod
    async def remove(self, worker_name: str) -> bool:
        """Forget a worker; False if it was unknown."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreError if the store cannot be used."""

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
        self._workers: dict[str, WorkerInfo] = {}
        self._lock = asyncio.Lock()

    async def put(self, info: WorkerInfo) -> None:
        async with self._lock:
            self._workers[info.worker_name] = info.model_copy(deep=True)

    async def get(self, worker_name: str) -> WorkerInfo | None:
        async with self._lock:
            info = self._workers.get(worker_name)
            return info.model_copy(deep=True) if info else None

    async def list(self) -> list[WorkerInfo]:
        async with self._lock:
            return [self._workers[k].model_copy(deep=True) for k in sorted(self._workers)]

    async def update(self, worker_name: str, fields: dict[str, Any]) -> bool:
        _checked(fields)
        async with self._lock:
            info = self._workers.get(worker_name)
            if info is None:
                return False
            self._workers[worker_name] = info.model_copy(update=fields, deep=True)
            return True

    async def incr_dispatched(self, worker_name: str) -> bool:
        async with self._lock:
            info = self._workers.get(worker_name)
            if info is None:
                return False
            info.dispatched += 1
            return True

    async def remove(self, worker_name: str) -> bool:
        async with self._lock:
            return self._workers.pop(worker_name, None) is not None

    async def ping(self) -> None:
        return None  # always reachable

    async def close(self) -> None:
        return None  # nothing to release


def make_store(redis_url: str | None, redis_prefix: str) -> WorkerStore:
    if redis_url is None:
        return MemoryStore()
    from pagedserve.controller.redis_store import RedisStore

    return RedisStore(redis_url, prefix=redis_prefix)
