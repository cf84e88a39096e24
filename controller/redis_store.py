"""The registry in Redis, shared by every controller replica that points at the same server.

Layout under `prefix`:
  {prefix}:workers               a set of worker names
  {prefix}:worker:{worker_name}  a hash, one field per WorkerInfo field, each value JSON
  {prefix}:beats                 a sorted set: worker name by its last heartbeat (expiry)
  {prefix}:changes               a stream of worker names whose membership changed:
                                 registered, removed, or a field that decides which pools
                                 hold it (state, drain, readiness, models)
Partial updates (heartbeats, health checks, dispatch counts) run as small Lua scripts that
write only if the worker still exists, so a heartbeat racing an expiry never resurrects half
a worker, and that log a membership change in the same step.

Dispatch reads a local `WorkerIndex` (store.py says how it is kept fresh). This process's
writes apply to it at once. `refresh_view()`, once per sweep, brings in other replicas' writes
without reading every worker: it rereads the workers named in the change stream since its last
refresh, and the load fields of a rotating slice of `_LOAD_SLICE` workers (all of them in a
registry that small); it reloads everything only at the start, or when the stream was trimmed
past what it had read. Local writes that land while a refresh awaits Redis are replayed after
the refresh applies what it read, so none is lost to a read that predates it. (A dispatch
count replayed onto a record that Redis already counted it in counts twice, until the worker's
next heartbeat resets the count.) Expiry asks the sorted set for the silent workers only.

Heartbeats and dispatch counts for workers the view knows are answered from the view and
written behind, every `_FLUSH_EVERY` seconds in one pipeline: at 20,000 workers a round trip
each would cost the controller most of a core. Until written they are laid over what a refresh
reads back. A heartbeat that changes membership, or names a worker the view does not know,
is written at once, so its answer is the store's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from pagedserve.controller.store import StoreError, WorkerStore, _checked
from pagedserve.controller.worker_index import MEMBERSHIP, WorkerIndex
from pagedserve.protocol.registry import WorkerInfo

logger = logging.getLogger(__name__)

_REFRESH_CHUNK = 500  # workers read per round trip in a full reload
_LOAD_SLICE = 2_000  # workers whose load fields one refresh rereads
_CHANGES_MAXLEN = 100_000  # about; a replica that falls further behind reloads everything
_FLUSH_EVERY = 0.01  # seconds a heartbeat or dispatch count waits to be written
# What other replicas change between refreshes and least_load compares.
_LOAD_FIELDS = ("queue_length", "dispatched", "running", "waiting", "kv_usage", "last_heart_beat")

# KEYS: the worker's hash, the beats set, the changes stream. ARGV: the worker_id the record
# must have (JSON) or "" for any, the worker's name, then field, value pairs.
_UPDATE_IF_EXISTS = (
    "local membership = {"
    + ", ".join(f"{name} = true" for name in sorted(MEMBERSHIP))
    + f"""}}
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'worker_id') ~= ARGV[1] then return 0 end
local moved = false
for i = 3, #ARGV, 2 do
    local field = ARGV[i]
    if membership[field] and not moved and redis.call('HGET', KEYS[1], field) ~= ARGV[i + 1] then
        moved = true
    end
    if field == 'last_heart_beat' then redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[2]) end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if moved then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', {_CHANGES_MAXLEN}, '*', 'w', ARGV[2])
end
return 1
"""
)

# The load fields (ARGV) of many workers (KEYS) as one JSON text: the fields are stored as
# JSON already, so Redis only joins them, and the client parses one reply, not six per worker.
# A field that is missing (a worker that is gone: all of them) reads as null.
_READ_LOADS = """
local rows = {}
for i, key in ipairs(KEYS) do
    local values = redis.call('HMGET', key, unpack(ARGV))
    for j = 1, #ARGV do
        if not values[j] then values[j] = 'null' end
    end
    rows[i] = '[' .. table.concat(values, ',') .. ']'
end
return '[' .. table.concat(rows, ',') .. ']'
"""

_INCR_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'dispatched', ARGV[1])
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


class _LoadBatch:
    """The workers whose load fields one read will get, for the dispatches awaiting it."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # read, so that a failure every waiter gave up on is not reported as unretrieved
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())


class _Unwritten:
    """Heartbeats and dispatch counts answered from the view, not yet written to Redis."""

    def __init__(self) -> None:
        self.updates: dict[str, tuple[dict[str, Any], str | None]] = {}  # name: fields, id
        self.dispatched: Counter[str] = Counter()

    def __bool__(self) -> bool:
        return bool(self.updates or self.dispatched)

    def lay_over(self, index: WorkerIndex, names: Iterable[str]) -> None:
        """Apply these writes to `names` in `index`, which were just read from Redis."""
        for name in names:
            if name in self.updates:
                index.update(name, self.updates[name][0])
            for _ in range(self.dispatched.get(name, 0)):
                index.incr_dispatched(name)


class RedisStore(WorkerStore):
    def __init__(self, url: str, prefix: str = "pagedserve:controller", timeout: float = 5.0):
        self.url = url
        self.prefix = prefix
        self._redis = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._update = self._redis.register_script(_UPDATE_IF_EXISTS)
        self._incr = self._redis.register_script(_INCR_IF_EXISTS)
        self._loads = self._redis.register_script(_READ_LOADS)
        self._index = WorkerIndex()
        self._replay: list[Callable[[WorkerIndex], object]] | None = None  # during a refresh
        # workers whose load this process learned during a refresh: fresher than its reads
        self._touched: set[str] | None = None
        self._seen: str | None = None  # the last change read; None: reload everything
        self._changes_read = 0  # how many entries the stream had up to `_seen`
        self._load_cursor = 0  # where the next slice of load fields starts
        self._unwritten = _Unwritten()
        self._writing: _Unwritten | None = None  # in a pipeline that has not answered yet
        self._writer: asyncio.Task[None] | None = None
        self._failure: StoreError | None = None  # how the last refresh failed, if it did
        self._load_batch: _LoadBatch | None = None  # workers whose loads the next read gets
        self._load_reads: set[asyncio.Task[None]] = set()

    @property
    def view(self) -> WorkerIndex:
        return self._index

    def _local(self, change: Callable[[WorkerIndex], object]) -> None:
        """Apply a write this process made to the view (and replay it after a refresh)."""
        change(self._index)
        if self._replay is not None:
            self._replay.append(change)

    def _touch(self, worker_name: str) -> None:
        """This process just learned the worker's load: a refresh under way, whose reads may be
        older, must not overwrite it."""
        if self._touched is not None:
            self._touched.add(worker_name)

    def _lay_unwritten_over(self, index: WorkerIndex, names: Iterable[str]) -> None:
        names = list(names)
        for batch in (self._writing, self._unwritten):  # oldest first
            if batch:
                batch.lay_over(index, names)

    async def refresh_view(self) -> None:
        """Read what other replicas wrote, then apply it all in one synchronous step: the
        unwritten writes laid over the workers just read, then this process's own writes made
        while the reads awaited (the view kept serving them)."""
        self._replay, self._touched = [], set()
        try:
            with _store_errors(self.url):
                last, added, length = await self._stream_position()
                # entries leave the stream from its head: past the ones read, some went unread
                if self._seen is None or added is None or added - length > self._changes_read:
                    workers = await self._read(list(await self._redis.smembers(self._names_key)))
                    index = WorkerIndex(w for w in workers.values() if w is not None)
                    # read before the workers: a change made during the reload comes again
                    self._seen, self._changes_read = last, added or 0
                else:
                    index = self._index
                    workers = await self._read_changes()
                loads = await self._read_loads([w.worker_name for w in index.workers()])
            for name, info in workers.items():
                if info is None:
                    index.remove(name)
                elif index is self._index:
                    index.put(info)
            for name, fields in loads.items():
                if name not in self._touched:  # else a heartbeat or a read came after ours
                    index.update(name, fields)
            self._lay_unwritten_over(index, {*workers, *loads})
            for change in self._replay:
                change(index)
            self._index = index
        except StoreError as e:
            self._failure = e
            raise
        else:
            self._failure = None
        finally:
            self._replay = self._touched = None

    async def _stream_position(self) -> tuple[str, int | None, int]:
        """The change stream's last entry id, how many entries it ever had, and has now."""
        try:
            info = await self._redis.xinfo_stream(self._changes_key)
        except ResponseError:  # no stream yet: nothing changed since the registry was empty
            return "0-0", 0, 0
        # Redis before 7 does not count: None makes every refresh a reload
        return info["last-generated-id"], info.get("entries-added"), info["length"]

    async def _read(self, names: Sequence[str]) -> dict[str, WorkerInfo | None]:
        """The workers of these names as Redis has them; None for those it no longer has."""
        workers: dict[str, WorkerInfo | None] = {}
        for start in range(0, len(names), _REFRESH_CHUNK):
            chunk = names[start : start + _REFRESH_CHUNK]
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in chunk:
                    pipe.hgetall(self._key(name))
                raws = await pipe.execute()
            for name, raw in zip(chunk, raws, strict=True):
                workers[name] = _decode(raw) if raw else None
        return workers

    async def _read_changes(self) -> dict[str, WorkerInfo | None]:
        """The workers whose membership changed since the last refresh."""
        entries = await self._redis.xrange(self._changes_key, min=f"({self._seen}", max="+")
        if not entries:
            return {}
        workers = await self._read(list(dict.fromkeys(fields["w"] for _, fields in entries)))
        self._seen = entries[-1][0]
        self._changes_read += len(entries)
        return workers

    async def _read_loads(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """The load fields of the next `_LOAD_SLICE` of `names`, taken in turn."""
        if not names:
            return {}
        start = self._load_cursor % len(names)
        chosen = (names[start:] + names[:start])[:_LOAD_SLICE]
        self._load_cursor = start + len(chosen)
        return await self._load_fields(chosen)

    async def _load_fields(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The load fields of these workers (those Redis still has)."""
        if not names:
            return {}
        rows = json.loads(await self._loads(keys=[self._key(n) for n in names], args=_LOAD_FIELDS))
        return {
            name: dict(zip(_LOAD_FIELDS, row, strict=True))
            for name, row in zip(names, rows, strict=True)
            if None not in row
        }

    async def refresh_load(self, workers: Sequence[WorkerInfo]) -> None:
        """Dispatches that ask while a read is being gathered share it: the read starts at the
        event loop's next turn, with every worker asked for by then, so many concurrent
        dispatches cost one round trip (each still sees loads read after it asked)."""
        if self._load_batch is None:
            self._load_batch = _LoadBatch()
            asyncio.get_running_loop().call_soon(self._read_load_batch)
        batch = self._load_batch
        batch.names.update(w.worker_name for w in workers)
        await asyncio.shield(batch.done)

    def _read_load_batch(self) -> None:
        batch, self._load_batch = self._load_batch, None
        task = asyncio.ensure_future(self._apply_loads(batch))
        self._load_reads.add(task)  # a reference, until it is done
        task.add_done_callback(self._load_reads.discard)

    async def _apply_loads(self, batch: _LoadBatch) -> None:
        try:
            with _store_errors(self.url):
                loads = await self._load_fields(sorted(batch.names))
        except StoreError as e:
            batch.done.set_exception(e)
            return
        for name, fields in loads.items():
            if (w := self._index.get(name)) is not None:
                for field_name, value in fields.items():
                    setattr(w, field_name, value)
            self._touch(name)
        self._lay_unwritten_over(self._index, loads)
        batch.done.set_result(None)

    @property
    def _names_key(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def _beats_key(self) -> str:
        return f"{self.prefix}:beats"

    @property
    def _changes_key(self) -> str:
        return f"{self.prefix}:changes"

    async def _update_if_exists(
        self, worker_name: str, fields: dict[str, Any], worker_id: str | None, client: Any = None
    ) -> Any:
        """Run _UPDATE_IF_EXISTS (queued on `client` when it is a pipeline)."""
        expected = "" if worker_id is None else json.dumps(worker_id)
        args = [expected, worker_name, *(x for kv in _encode(fields).items() for x in kv)]
        keys = [self._key(worker_name), self._beats_key, self._changes_key]
        return await self._update(keys=keys, args=args, client=client)

    def _log_change(self, pipe: Any, worker_name: str) -> None:
        pipe.xadd(self._changes_key, {"w": worker_name}, maxlen=_CHANGES_MAXLEN, approximate=True)

    def _key(self, worker_name: str) -> str:
        return f"{self.prefix}:worker:{worker_name}"

    async def put(self, info: WorkerInfo) -> None:
        with _store_errors(self.url):
            async with self._redis.pipeline(transaction=True) as pipe:
                key = self._key(info.worker_name)
                pipe.delete(key)
                pipe.hset(key, mapping=_encode(info.model_dump()))
                pipe.sadd(self._names_key, info.worker_name)
                pipe.zadd(self._beats_key, {info.worker_name: info.last_heart_beat})
                self._log_change(pipe, info.worker_name)
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
        with _store_errors(self.url):
            exists = bool(await self._update_if_exists(worker_name, _checked(fields), worker_id))
        if exists:
            self._local(lambda index: index.update(worker_name, fields))
        return exists

    async def record_heartbeat(
        self, worker_name: str, fields: dict[str, Any], worker_id: str | None = None
    ) -> bool:
        known = self._index.get(worker_name)
        if (
            known is None
            or (worker_id is not None and known.worker_id != worker_id)
            or any(k in MEMBERSHIP and getattr(known, k) != v for k, v in fields.items())
        ):
            return await self.update(worker_name, fields, worker_id)
        self._index.update(worker_name, _checked(fields))
        self._touch(worker_name)
        queued = self._unwritten.updates.get(worker_name)
        merged = {**queued[0], **fields} if queued else fields
        self._unwritten.updates[worker_name] = (merged, worker_id)
        if "dispatched" in fields:  # a reset supersedes the counts queued before it
            self._unwritten.dispatched.pop(worker_name, None)
        self._write_soon()
        return True

    async def incr_dispatched(self, worker_name: str) -> bool:
        if self._index.incr_dispatched(worker_name):
            self._touch(worker_name)
            self._unwritten.dispatched[worker_name] += 1
            self._write_soon()
            return True
        with _store_errors(self.url):
            exists = bool(await self._incr(keys=[self._key(worker_name)], args=[1]))
        if exists:
            self._local(lambda index: index.incr_dispatched(worker_name))
        return exists

    def _write_soon(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_behind(), name="redis-write-behind")

    async def _write_behind(self) -> None:
        while self._unwritten:
            await asyncio.sleep(_FLUSH_EVERY)
            await self.flush()

    async def flush(self) -> None:
        batch, self._unwritten = self._unwritten, _Unwritten()
        if not batch:
            return
        self._writing = batch
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name, (fields, worker_id) in batch.updates.items():
                    await self._update_if_exists(name, fields, worker_id, client=pipe)
                for name, count in batch.dispatched.items():
                    await self._incr(keys=[self._key(name)], args=[count], client=pipe)
                await pipe.execute()
        except RedisError as e:  # the workers' next heartbeats write again
            logger.warning("%d writes to Redis lost: %s", len(batch.updates), e)
        finally:
            self._writing = None

    async def remove(self, worker_name: str) -> bool:
        with _store_errors(self.url):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(worker_name))
                pipe.srem(self._names_key, worker_name)
                pipe.zrem(self._beats_key, worker_name)
                self._log_change(pipe, worker_name)
                deleted, *_ = await pipe.execute()
        self._local(lambda index: index.remove(worker_name))
        return bool(deleted)

    async def silent_since(self, deadline: float) -> list[str]:
        with _store_errors(self.url):
            return list(await self._redis.zrangebyscore(self._beats_key, "-inf", f"({deadline}"))

    async def ping(self) -> None:
        with _store_errors(self.url):
            await self._redis.ping()

    def raise_if_down(self) -> None:
        if self._failure is not None:  # the refresh a sweep ago failed (at most 1 s ago)
            raise self._failure

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
        await self.flush()
        await self._redis.aclose()
