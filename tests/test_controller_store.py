"""One suite, both stores: the in-memory registry and the Redis one (a real redis-server)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from servers import RedisServer, redis_or_skip

from pagedserve.controller.store import MemoryStore, WorkerStore
from pagedserve.protocol.registry import WorkerInfo

StoreFactory = Callable[[], WorkerStore]
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_or_skip(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def new_store(request: pytest.FixtureRequest) -> StoreFactory:
    """A factory: stores made in one test share one registry (a fresh one per test)."""
    if request.param == "memory":
        shared = MemoryStore()
        return lambda: shared
    from pagedserve.controller.redis_store import RedisStore

    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test{next(_prefixes)}"
    return lambda: RedisStore(server.url, prefix=prefix)


def run(new_store: StoreFactory, body: Callable[[WorkerStore], Awaitable[None]]) -> None:
    async def main() -> None:
        store = new_store()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def worker(name: str = "http://127.0.0.1:1", **fields) -> WorkerInfo:
    defaults = {
        "worker_id": name[-6:],
        "model_names": ["m"],
        "registered_at": 1.0,
        "last_heart_beat": 1.0,
    }
    return WorkerInfo(worker_name=name, **{**defaults, **fields})


def test_put_then_get_round_trips_every_field(new_store: StoreFactory) -> None:
    info = worker(
        model_names=["a", "b"],
        kind="fastchat",
        speed=3,
        queue_length=4,
        running=2,
        waiting=2,
        kv_usage=0.25,
        state="draining",
        drain_requested=True,
        ready=False,
        health_failures=1,
        dispatched=7,
        check_heart_beat=False,
        multimodal=True,
        context_length=2048,
        registered_at=12.5,
        last_heart_beat=13.25,
    )

    async def body(store: WorkerStore) -> None:
        await store.put(info)
        assert await store.get(info.worker_name) == info
        assert await store.get("http://127.0.0.1:2") is None

    run(new_store, body)


def test_list_is_ordered_by_worker_name(new_store: StoreFactory) -> None:
    async def body(store: WorkerStore) -> None:
        assert await store.list() == []
        for port in (3, 1, 2):
            await store.put(worker(f"http://127.0.0.1:{port}"))
        names = [w.worker_name for w in await store.list()]
        assert names == ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]

    run(new_store, body)


def test_update_changes_only_a_known_worker(new_store: StoreFactory) -> None:
    async def body(store: WorkerStore) -> None:
        await store.put(worker())
        assert await store.update("http://127.0.0.1:1", {"queue_length": 5, "state": "draining"})
        got = await store.get("http://127.0.0.1:1")
        assert got is not None and (got.queue_length, got.state, got.model_names) == (
            5,
            "draining",
            ["m"],
        )
        assert not await store.update("http://127.0.0.1:9", {"queue_length": 5})
        assert await store.get("http://127.0.0.1:9") is None
        assert len(await store.list()) == 1

    run(new_store, body)


def test_update_for_a_worker_id_writes_only_that_worker(new_store: StoreFactory) -> None:
    """A heartbeat from the old process at a restarted worker's address changes nothing."""

    async def body(store: WorkerStore) -> None:
        await store.put(worker(worker_id="new"))
        assert not await store.update("http://127.0.0.1:1", {"queue_length": 5}, worker_id="old")
        assert (await store.get("http://127.0.0.1:1")).queue_length == 0
        assert store.view.get("http://127.0.0.1:1").queue_length == 0
        assert await store.update("http://127.0.0.1:1", {"queue_length": 6}, worker_id="new")
        assert (await store.get("http://127.0.0.1:1")).queue_length == 6
        assert store.view.get("http://127.0.0.1:1").queue_length == 6
        assert not await store.update("http://127.0.0.1:9", {"queue_length": 5}, worker_id="new")

    run(new_store, body)


def test_update_rejects_unknown_fields(new_store: StoreFactory) -> None:
    async def body(store: WorkerStore) -> None:
        await store.put(worker())
        with pytest.raises(KeyError):
            await store.update("http://127.0.0.1:1", {"no_such_field": 1})

    run(new_store, body)


def test_dispatched_counts_up_and_a_heartbeat_resets_it(new_store: StoreFactory) -> None:
    async def body(store: WorkerStore) -> None:
        name = "http://127.0.0.1:1"
        await store.put(worker())
        for _ in range(3):
            assert await store.incr_dispatched(name)
        assert store.view.get(name).dispatched == 3  # at once in the view
        await store.flush()
        assert (await store.get(name)).dispatched == 3
        assert await store.record_heartbeat(name, {"dispatched": 0, "queue_length": 3})
        assert await store.incr_dispatched(name)  # after the reset: counts
        assert store.view.get(name).dispatched == 1
        await store.flush()
        got = await store.get(name)
        assert (got.dispatched, got.queue_length) == (1, 3)

    run(new_store, body)


def test_concurrent_dispatch_counts_are_exact(new_store: StoreFactory) -> None:
    async def body(store: WorkerStore) -> None:
        await store.put(worker())
        await asyncio.gather(*(store.incr_dispatched("http://127.0.0.1:1") for _ in range(50)))
        await store.flush()
        assert (await store.get("http://127.0.0.1:1")).dispatched == 50

    run(new_store, body)


def test_written_behind_counts_reach_the_store_by_themselves(new_store: StoreFactory) -> None:
    async def body(store: WorkerStore) -> None:
        await store.put(worker())
        assert await store.incr_dispatched("http://127.0.0.1:1")
        assert await store.record_heartbeat("http://127.0.0.1:1", {"queue_length": 4})
        await asyncio.sleep(0.5)  # write-behind runs every 10 ms
        got = await store.get("http://127.0.0.1:1")
        assert (got.dispatched, got.queue_length) == (1, 4)

    run(new_store, body)


def test_a_heartbeat_answers_false_for_an_unknown_or_replaced_worker(
    new_store: StoreFactory,
) -> None:
    async def body(store: WorkerStore) -> None:
        await store.put(worker(worker_id="new"))
        assert not await store.record_heartbeat("http://127.0.0.1:1", {"queue_length": 1}, "old")
        assert not await store.record_heartbeat("http://127.0.0.1:2", {"queue_length": 1}, "new")
        assert await store.record_heartbeat("http://127.0.0.1:1", {"queue_length": 2}, "new")
        await store.flush()
        assert (await store.get("http://127.0.0.1:1")).queue_length == 2

    run(new_store, body)


def test_counting_an_unknown_worker_creates_nothing(new_store: StoreFactory) -> None:
    async def body(store: WorkerStore) -> None:
        assert not await store.incr_dispatched("http://127.0.0.1:5")
        assert await store.get("http://127.0.0.1:5") is None
        assert await store.list() == []

    run(new_store, body)


def test_register_again_replaces_the_whole_entry(new_store: StoreFactory) -> None:
    async def body(store: WorkerStore) -> None:
        await store.put(worker(model_names=["old"], dispatched=4, drain_requested=True))
        await store.put(worker(model_names=["new"], worker_id="other"))
        got = await store.get("http://127.0.0.1:1")
        assert (got.model_names, got.dispatched, got.drain_requested, got.worker_id) == (
            ["new"],
            0,
            False,
            "other",
        )
        assert len(await store.list()) == 1

    run(new_store, body)


def test_remove_forgets_a_worker_once(new_store: StoreFactory) -> None:
    async def body(store: WorkerStore) -> None:
        await store.put(worker())
        await store.put(worker("http://127.0.0.1:2"))
        assert await store.remove("http://127.0.0.1:1")
        assert not await store.remove("http://127.0.0.1:1")
        assert [w.worker_name for w in await store.list()] == ["http://127.0.0.1:2"]
        assert not await store.update("http://127.0.0.1:1", {"queue_length": 1})

    run(new_store, body)


def test_two_store_clients_see_one_registry(new_store: StoreFactory) -> None:
    """What lets controller replicas share Redis (trivially true for one memory store)."""

    async def body(store: WorkerStore) -> None:
        other = new_store()
        try:
            await store.put(worker())
            assert await other.incr_dispatched("http://127.0.0.1:1")
            assert (await store.get("http://127.0.0.1:1")).dispatched == 1
            assert await other.remove("http://127.0.0.1:1")
            assert await store.list() == []
        finally:
            if other is not store:
                await other.close()

    run(new_store, body)


def test_a_local_write_during_a_view_refresh_survives_it(redis_server: RedisServer) -> None:
    """The Redis view is rebuilt from reads that may predate this process's own writes: those
    writes are replayed on the new view before it replaces the old."""
    from pagedserve.controller.redis_store import RedisStore

    async def body() -> None:
        store = RedisStore(redis_server.url, prefix=f"test{next(_prefixes)}")
        written = asyncio.Event()
        real_pipeline = store._redis.pipeline

        def pipeline_pausing_after_reads(transaction: bool = True):
            pipe = real_pipeline(transaction=transaction)
            if not transaction:  # the refresh's reads (writes use transactions or scripts)
                real_execute = pipe.execute

                async def execute(*args, **kwargs):
                    result = await real_execute(*args, **kwargs)
                    await written.wait()
                    return result

                pipe.execute = execute
            return pipe

        try:
            for i in range(1, 4):
                await store.put(worker(f"http://127.0.0.1:{i}"))
            store._redis.pipeline = pipeline_pausing_after_reads
            refresh = asyncio.create_task(store.refresh_view())
            await asyncio.sleep(0.2)  # the refresh has read Redis and waits
            await store.update("http://127.0.0.1:1", {"queue_length": 9, "state": "draining"})
            await store.remove("http://127.0.0.1:2")
            await store.put(worker("http://127.0.0.1:4"))
            written.set()
            await refresh
            view = store.view
            assert view.get("http://127.0.0.1:1").queue_length == 9
            assert view.get("http://127.0.0.1:2") is None and view.get("http://127.0.0.1:4")
            names = [w.worker_name for w in view.candidates("m")]
            assert names == ["http://127.0.0.1:3", "http://127.0.0.1:4"]  # 1 drains, 2 is gone
        finally:
            await store.close()

    asyncio.run(body())


def test_silent_since_names_only_workers_whose_heartbeats_stopped(new_store: StoreFactory) -> None:
    async def body(store: WorkerStore) -> None:
        await store.put(worker("http://127.0.0.1:1", last_heart_beat=10.0))
        await store.put(worker("http://127.0.0.1:2", last_heart_beat=10.0))
        await store.put(worker("http://127.0.0.1:3", last_heart_beat=90.0))
        await store.update("http://127.0.0.1:2", {"last_heart_beat": 95.0})  # a heartbeat
        assert await store.silent_since(50.0) == ["http://127.0.0.1:1"]
        await store.remove("http://127.0.0.1:1")
        assert await store.silent_since(50.0) == []

    run(new_store, body)


def test_a_replica_refresh_reads_only_what_changed(redis_server: RedisServer) -> None:
    """Another replica's registrations, removals and drains reach this view by the change
    stream (only those workers are reread); heartbeats' load, by the rotating load slice."""
    from pagedserve.controller import redis_store
    from pagedserve.controller.redis_store import RedisStore

    async def body() -> None:
        prefix = f"test{next(_prefixes)}"
        writer, reader = RedisStore(redis_server.url, prefix), RedisStore(redis_server.url, prefix)
        reread: list[str] = []
        real_key = reader._key
        reader._key = lambda name: reread.append(name) or real_key(name)
        try:
            for i in range(1, 6):
                await writer.put(worker(f"http://127.0.0.1:{i}"))
            await reader.refresh_view()  # the first refresh reads everything
            assert len(reader.view) == 5
            reread.clear()
            await writer.remove("http://127.0.0.1:1")
            await writer.update("http://127.0.0.1:2", {"state": "draining"})
            await writer.put(worker("http://127.0.0.1:6"))
            await writer.update("http://127.0.0.1:3", {"queue_length": 4})  # load only
            redis_store_slice = redis_store._LOAD_SLICE
            redis_store._LOAD_SLICE = 0  # this refresh rereads no load
            try:
                await reader.refresh_view()
            finally:
                redis_store._LOAD_SLICE = redis_store_slice
            assert sorted(reread) == [
                "http://127.0.0.1:1",
                "http://127.0.0.1:2",
                "http://127.0.0.1:6",
            ]
            pool = [w.worker_name for w in reader.view.candidates("m")]
            assert pool == [f"http://127.0.0.1:{i}" for i in (3, 4, 5, 6)]
            assert reader.view.get("http://127.0.0.1:3").queue_length == 0  # not yet
            await reader.refresh_view()  # the load slice covers every worker of a small registry
            assert reader.view.get("http://127.0.0.1:3").queue_length == 4

            # a stream trimmed past what the reader read: it reloads everything
            await writer.put(worker("http://127.0.0.1:7"))
            await writer._redis.xtrim(writer._changes_key, maxlen=0, approximate=False)
            await writer._redis.delete(writer._key("http://127.0.0.1:4"))  # unlogged change
            await writer.put(worker("http://127.0.0.1:8"))
            await reader.refresh_view()
            names = {w.worker_name for w in reader.view.workers()}
            assert names == {f"http://127.0.0.1:{i}" for i in (2, 3, 5, 6, 7, 8)}
        finally:
            await writer.close()
            await reader.close()

    asyncio.run(body())


def test_a_refresh_keeps_writes_not_yet_written_behind(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pagedserve.controller import redis_store
    from pagedserve.controller.redis_store import RedisStore

    monkeypatch.setattr(redis_store, "_FLUSH_EVERY", 60.0)  # nothing is written by itself

    async def body() -> None:
        store = RedisStore(redis_server.url, prefix=f"test{next(_prefixes)}")
        try:
            name = "http://127.0.0.1:1"
            await store.put(worker())
            await store.refresh_view()
            assert await store.record_heartbeat(name, {"queue_length": 7, "dispatched": 0})
            assert await store.incr_dispatched(name)
            assert (await store.get(name)).queue_length == 0  # not written yet
            store._seen = None  # the next refresh reloads everything
            await store.refresh_view()
            assert (store.view.get(name).queue_length, store.view.get(name).dispatched) == (7, 1)
            await store.refresh_view()  # the incremental path, with the load slice
            assert (store.view.get(name).queue_length, store.view.get(name).dispatched) == (7, 1)
            await store.flush()
            got = await store.get(name)
            assert (got.queue_length, got.dispatched) == (7, 1)
        finally:
            await store.close()

    asyncio.run(body())


def test_concurrent_load_refreshes_share_one_read(redis_server: RedisServer) -> None:
    """A small pool's loads are read per dispatch; 32 dispatches at once cost one round trip,
    and each sees what another replica wrote before it asked."""
    from pagedserve.controller.redis_store import RedisStore

    async def body() -> None:
        prefix = f"test{next(_prefixes)}"
        store, other = RedisStore(redis_server.url, prefix), RedisStore(redis_server.url, prefix)
        try:
            for i in range(1, 4):
                await store.put(worker(f"http://127.0.0.1:{i}"))
            await other.update("http://127.0.0.1:2", {"queue_length": 5})
            calls = 0
            real = store._load_fields

            async def counting(names):
                nonlocal calls
                calls += 1
                return await real(names)

            store._load_fields = counting
            pool = store.view.candidates("m")
            await asyncio.gather(*(store.refresh_load(pool) for _ in range(32)))
            assert calls == 1
            assert [w.queue_length for w in pool] == [0, 5, 0]
            await other.update("http://127.0.0.1:3", {"queue_length": 7})
            await store.refresh_load(pool)
            assert calls == 2 and [w.queue_length for w in pool] == [0, 5, 7]
        finally:
            await store.close()
            await other.close()

    asyncio.run(body())


def test_a_refresh_never_undoes_a_load_learned_while_it_read(redis_server: RedisServer) -> None:
    """A heartbeat answered and written while a refresh awaited its reads is newer than what
    the refresh read: the view keeps it (a dispatch right after must see the load)."""
    from pagedserve.controller.redis_store import RedisStore

    async def body() -> None:
        store = RedisStore(redis_server.url, prefix=f"test{next(_prefixes)}")
        name = "http://127.0.0.1:1"
        try:
            await store.put(worker())
            await store.refresh_view()
            read, learned = asyncio.Event(), asyncio.Event()
            real = store._read_loads

            async def reads_then_waits(names):
                loads = await real(names)
                read.set()
                await learned.wait()
                return loads

            store._read_loads = reads_then_waits
            refresh = asyncio.create_task(store.refresh_view())
            await read.wait()  # the refresh has read queue_length 0
            assert await store.record_heartbeat(name, {"queue_length": 3, "dispatched": 0})
            await store.flush()  # written: no longer laid over by the refresh
            learned.set()
            await refresh
            assert store.view.get(name).queue_length == 3
        finally:
            await store.close()

    asyncio.run(body())


def test_redis_store_down_raises_store_error(tmp_path: Path) -> None:
    from servers import free_port

    from pagedserve.controller.redis_store import RedisStore
    from pagedserve.controller.store import StoreError

    async def body() -> None:
        store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
        try:
            with pytest.raises(StoreError, match="Redis at"):
                await store.ping()
            with pytest.raises(StoreError):
                await store.list()
        finally:
            await store.close()

    asyncio.run(body())
