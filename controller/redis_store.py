"""The registry in Redis, shared by every controller replica that points at the same server.

Layout under `prefix`:
  {prefix}:workers               a set of worker names
  {prefix}:worker:{worker_name}  a hash, one field per WorkerInfo field, each value JSON
Partial updates (heartbeats, health checks, dispatch counts) run as small Lua scripts that
write only if the worker still exists, so a heartbeat racing an expiry never resurrects half
a worker.

Dispatch reads a local `WorkerIndex` (store.py says how it is kept fresh): this process's
writes apply to it at once; `refresh_view()` reloads it from Redis in chunks of
`_REFRESH_CHUNK` workers, so that a large registry never holds the event loop for long. Local
writes that land while a refresh is in flight are applied to the old view at once and replayed
on the new one before it replaces the old, so none is lost to a refresh that read Redis before
it. (A dispatch count replayed onto a record that Redis already counted it in counts twice,
until the worker's next heartbeat resets the count.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from pagedserve.controller.protocol import WorkerInfo
from pagedserve.controller.store import StoreError, WorkerStore, _checked
from pagedserve.controller.worker_index import WorkerIndex

_REFRESH_CHUNK = 500
# What other replicas change between refreshes and least_load compares.
_LOAD_FIELDS = ("queue_length", "dispatched", "running", "waiting", "kv_usage")

# ARGV[1]: the worker_id the record must have (JSON), or "" for any; then field, value pairs.
_UPDATE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'worker_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

_INCR_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return 1
"""


@contextmanager
def _store_errors(url: str) -> Iterator[None]:
    try:
        yield
    except RedisError as e:
        raise StoreError(f"Redis at {url} failed: {e}") from e


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in fields.items()}


def _decode(raw: dict[str, str]) -> WorkerInfo:
    return WorkerInfo.model_validate({k: json.loads(v) for k, v in raw.items()})


class RedisStore(WorkerStore):
    def __init__(self, url: str, prefix: str = "pagedserve:controller", timeout: float = 5.0):
        self.url = url
        self.prefix = prefix
        self._redis = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._update = self._redis.register_script(_UPDATE_IF_EXISTS)
        self._incr = self._redis.register_script(_INCR_IF_EXISTS)
        self._index = WorkerIndex()
        self._replay: list[Callable[[WorkerIndex], object]] | None = None  # during a refresh

    @property
    def view(self) -> WorkerIndex:
        return self._index

    def _local(self, change: Callable[[WorkerIndex], object]) -> None:
        """Apply a write this process made to the view (and to the one a refresh is building)."""
        change(self._index)
        if self._replay is not None:
            self._replay.append(change)

    async def refresh_view(self) -> None:
        self._replay = []
        try:
            with _store_errors(self.url):
                names = list(await self._redis.smembers(self._names_key))
                workers = []
                for start in range(0, len(names), _REFRESH_CHUNK):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for name in names[start : start + _REFRESH_CHUNK]:
                            pipe.hgetall(self._key(name))
                        raws = await pipe.execute()
                    workers.extend(_decode(raw) for raw in raws if raw)
            index = WorkerIndex(workers)
            for change in self._replay:
                change(index)
            self._index = index
        finally:
            self._replay = None

    async def refresh_load(self, workers: Sequence[WorkerInfo]) -> None:
        with _store_errors(self.url):
            async with self._redis.pipeline(transaction=False) as pipe:
                for w in workers:
                    pipe.hmget(self._key(w.worker_name), _LOAD_FIELDS)
                rows = await pipe.execute()
        for w, row in zip(workers, rows, strict=True):
            if None not in row:
                for name, value in zip(_LOAD_FIELDS, row, strict=True):
                    setattr(w, name, json.loads(value))

    @property
    def _names_key(self) -> str:
        return f"{self.prefix}:workers"

    def _key(self, worker_name: str) -> str:
        return f"{self.prefix}:worker:{worker_name}"

    async def put(self, info: WorkerInfo) -> None:
        with _store_errors(self.url):
            async with self._redis.pipeline(transaction=True) as pipe:
                key = self._key(info.worker_name)
                pipe.delete(key)
                pipe.hset(key, mapping=_encode(info.model_dump()))
                pipe.sadd(self._names_key, info.worker_name)
                await pipe.execute()
        self._local(lambda index: index.put(info.model_copy(deep=True)))

    async def get(self, worker_name: str) -> WorkerInfo | None:
        with _store_errors(self.url):
            raw = await self._redis.hgetall(self._key(worker_name))
        return _decode(raw) if raw else None

    async def list(self) -> list[WorkerInfo]:
        with _store_errors(self.url):
            names = sorted(await self._redis.smembers(self._names_key))
            if not names:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._key(name))
                raws = await pipe.execute()
            gone = [n for n, raw in zip(names, raws, strict=True) if not raw]
            if gone:  # hash deleted by a replica between SMEMBERS and HGETALL
                await self._redis.srem(self._names_key, *gone)
        return [_decode(raw) for raw in raws if raw]

    async def update(
        self, worker_name: str, fields: dict[str, Any], worker_id: str | None = None
    ) -> bool:
        if not fields:
            known = await self.get(worker_name)
            return known is not None and worker_id in (None, known.worker_id)
        expected = "" if worker_id is None else json.dumps(worker_id)
        args = [expected, *(x for kv in _encode(_checked(fields)).items() for x in kv)]
        with _store_errors(self.url):
            exists = bool(await self._update(keys=[self._key(worker_name)], args=args))
        if exists:
            self._local(lambda index: index.update(worker_name, fields))
        return exists

    async def incr_dispatched(self, worker_name: str) -> bool:
        with _store_errors(self.url):
            exists = bool(await self._incr(keys=[self._key(worker_name)], args=["dispatched"]))
        if exists:
            self._local(lambda index: index.incr_dispatched(worker_name))
        return exists

    async def remove(self, worker_name: str) -> bool:
        with _store_errors(self.url):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(worker_name))
                pipe.srem(self._names_key, worker_name)
                deleted, _ = await pipe.execute()
        self._local(lambda index: index.remove(worker_name))
        return bool(deleted)

    async def ping(self) -> None:
        with _store_errors(self.url):
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
