"""The registry as dispatch reads it: every worker by name, and per model the workers that
accept requests, ordered by name, kept in step on each change rather than rebuilt per request.

A dispatch reads one `ModelPool` (O(1) to find, O(1) to index, O(1) to look up by id) and
copies nothing. Membership changes (register, remove, drain, a state or readiness change, new
model names) cost O(pool) once, by bisection and a list insert or delete; a heartbeat that only
moves load fields costs O(1). The stores own an index: `MemoryStore` keeps its workers in one,
`RedisStore` keeps a local one in step with its own writes and refreshes it from Redis.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Iterable, Iterator, ValuesView
from typing import Any

from pagedserve.controller.dispatch import Candidates
from pagedserve.protocol.registry import WorkerInfo


class ModelPool(Candidates):
    """One model's accepting workers, ordered by worker_name."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._workers: list[WorkerInfo] = []
        self._by_id: dict[str, WorkerInfo] = {}
        self.multimodal = 0  # how many of them are multimodal

    def __len__(self) -> int:
        return len(self._workers)

    def __getitem__(self, i):  # type: ignore[override]
        return self._workers[i]

    def __iter__(self) -> Iterator[WorkerInfo]:
        return iter(self._workers)

    def find(self, worker_id: str) -> WorkerInfo | None:
        return self._by_id.get(worker_id)

    def add(self, w: WorkerInfo) -> None:
        i = bisect.bisect_left(self._names, w.worker_name)
        assert i == len(self._names) or self._names[i] != w.worker_name, w.worker_name
        self._names.insert(i, w.worker_name)
        self._workers.insert(i, w)
        self._by_id[w.worker_id] = w
        self.multimodal += w.multimodal

    def discard(self, w: WorkerInfo) -> None:
        i = bisect.bisect_left(self._names, w.worker_name)
        if i == len(self._names) or self._names[i] != w.worker_name:
            return
        del self._names[i], self._workers[i]
        if self._by_id.get(w.worker_id) is w:
            del self._by_id[w.worker_id]
        self.multimodal -= w.multimodal


_EMPTY = ModelPool()


# The fields that decide which pools hold a worker, and how they find it there; a heartbeat
# that changes none of them changes no pool.
MEMBERSHIP = frozenset(
    {"state", "drain_requested", "ready", "model_names", "worker_id", "multimodal"}
)


class WorkerIndex:
    """Workers by name and per-model pools. Holds the objects it is given and changes them in
    place: callers that hand workers out beyond one synchronous read must copy them."""

    def __init__(self, workers: Iterable[WorkerInfo] = ()) -> None:
        self._workers: dict[str, WorkerInfo] = {}
        self._pools: dict[str, ModelPool] = {}
        for w in sorted(workers, key=lambda w: w.worker_name):
            self.put(w)

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, worker_name: str) -> WorkerInfo | None:
        return self._workers.get(worker_name)

    def workers(self) -> ValuesView[WorkerInfo]:
        """Every worker, in no particular order, uncopied: read them, do not keep them."""
        return self._workers.values()

    def candidates(self, model: str) -> ModelPool:
        """The workers of `model` that accept requests, ordered by name."""
        return self._pools.get(model, _EMPTY)

    def models(self, multimodal: bool | None = None) -> list[str]:
        """Models with at least one accepting worker (of that modality, if given)."""
        return sorted(
            m
            for m, pool in self._pools.items()
            if multimodal is None
            or (pool.multimodal > 0 if multimodal else pool.multimodal < len(pool))
        )

    def put(self, info: WorkerInfo) -> None:
        self.remove(info.worker_name)
        self._workers[info.worker_name] = info
        self._enter(info)

    def update(
        self, worker_name: str, fields: dict[str, Any], worker_id: str | None = None
    ) -> bool:
        info = self._workers.get(worker_name)
        if info is None or (worker_id is not None and info.worker_id != worker_id):
            return False
        moves = any(k in MEMBERSHIP and getattr(info, k) != v for k, v in fields.items())
        if moves:
            self._leave(info)
        for k, v in fields.items():
            setattr(info, k, copy.deepcopy(v) if isinstance(v, list | dict) else v)
        if moves:
            self._enter(info)
        return True

    def incr_dispatched(self, worker_name: str) -> bool:
        info = self._workers.get(worker_name)
        if info is None:
            return False
        info.dispatched += 1
        return True

    def remove(self, worker_name: str) -> WorkerInfo | None:
        info = self._workers.pop(worker_name, None)
        if info is not None:
            self._leave(info)
        return info

    def _enter(self, w: WorkerInfo) -> None:
        if w.accepting:
            for model in dict.fromkeys(w.model_names):
                self._pools.setdefault(model, ModelPool()).add(w)

    def _leave(self, w: WorkerInfo) -> None:
        if not w.accepting:
            return
        for model in dict.fromkeys(w.model_names):
            pool = self._pools.get(model)
            if pool is not None:
                pool.discard(w)
                if not pool:
                    del self._pools[model]
