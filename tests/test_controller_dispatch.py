"""Routing policies, the prefix index and the controller's configuration, tested alone (no
processes)."""

from __future__ import annotations

from collections import Counter

import pytest

from pagedserve.api_gateway.config import GatewayConfig
from pagedserve.controller.config import ControllerConfig
from pagedserve.controller.dispatch import (
    LeastLoad,
    Lottery,
    PrefixAware,
    RoundRobin,
    RouteRequest,
    RoutingPolicy,
    make_policy,
)
from pagedserve.controller.prefix_index import BLOCK_CHARS, BLOCK_TOKENS, PrefixIndex, block_keys
from pagedserve.protocol.registry import WorkerInfo


def w(port: int, **fields) -> WorkerInfo:
    return WorkerInfo(
        worker_name=f"http://127.0.0.1:{port}", worker_id=str(port), model_names=["m"], **fields
    )


def pick(policy: RoutingPolicy, workers: list[WorkerInfo], model: str = "m", **request):
    route = policy.select(workers, RouteRequest(model, **request))
    return None if route is None else route.worker


def test_round_robin_cycles_in_name_order_per_model() -> None:
    policy = RoundRobin()
    workers = [w(3), w(1), w(2)]
    picks = [pick(policy, workers, "m").worker_name[-1] for _ in range(6)]
    assert picks == ["1", "2", "3", "1", "2", "3"]
    assert pick(policy, workers, "other").worker_name.endswith(":1")  # its own counter
    assert pick(policy, [], "m") is None


def test_least_load_picks_the_shortest_queue_per_speed() -> None:
    policy = LeastLoad()
    assert pick(policy, [w(1, queue_length=5), w(2, queue_length=1)], "m").worker_id == "2"
    # twice as fast: 6/2 = 3 < 4
    assert pick(policy, [w(1, queue_length=6, speed=2), w(2, queue_length=4)], "m").worker_id == "1"


def test_least_load_counts_requests_dispatched_since_the_heartbeat() -> None:
    policy = LeastLoad()
    a, b = w(1, queue_length=2), w(2, queue_length=0)
    picks = []
    for _ in range(6):  # the controller counts each dispatch on the chosen worker
        chosen = pick(policy, [a, b], "m")
        chosen.dispatched += 1
        picks.append(chosen.worker_id)
    assert picks[:2] == ["2", "2"]  # b catches up with a's reported queue first
    assert Counter(picks[2:]) == {"1": 2, "2": 2}  # then they alternate


def test_least_load_weighs_kv_cache_use() -> None:
    policy = LeastLoad(kv_weight=1.0)
    assert pick(policy, [w(1, kv_usage=0.9), w(2, kv_usage=0.1)], "m").worker_id == "2"
    # a full cache weighs as much as one queued request
    assert (
        pick(policy, [w(1, kv_usage=0.0, queue_length=2), w(2, kv_usage=1.0)], "m").worker_id == "2"
    )
    with pytest.raises(ValueError, match="kv_weight"):
        LeastLoad(kv_weight=-1)


def test_least_load_ties_go_round_robin() -> None:
    policy = LeastLoad()
    workers = [w(1), w(2)]
    assert [pick(policy, workers, "m").worker_id for _ in range(4)] == ["1", "2", "1", "2"]


def test_lottery_follows_speed_and_skips_speed_zero() -> None:
    policy = Lottery(seed=0)
    picks = Counter(
        pick(policy, [w(1, speed=3), w(2, speed=1), w(3, speed=0)], "m").worker_id
        for _ in range(400)
    )
    assert picks["3"] == 0
    assert 240 < picks["1"] < 360
    assert pick(policy, [w(3, speed=0)], "m").worker_id == "3"  # the only one left


def test_fastchat_dispatch_names_are_accepted() -> None:
    assert isinstance(make_policy("shortest_queue"), LeastLoad)
    assert isinstance(make_policy("lottery"), Lottery)
    assert isinstance(make_policy("least_load"), LeastLoad)
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("prefix_aware"), PrefixAware)
    with pytest.raises(ValueError, match="least_load, round_robin, prefix_aware"):
        make_policy("fastest")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"routing_policy": "random"}, "routing policy 'random'"),
        ({"heartbeat_expiration": 0}, "heartbeat_expiration"),
        ({"health_check_interval": -1}, "health_check_interval"),
        ({"health_check_failure_threshold": 0}, "health_check_failure_threshold"),
        ({"port": 70000}, "port"),
        ({"redis_url": "localhost:6379"}, "redis_url"),
        ({"worker_api_timeout": 0}, "worker_api_timeout"),
    ],
)
def test_controller_config_refuses_bad_values(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ControllerConfig(**fields)


def test_sweep_interval_follows_the_expiration() -> None:
    assert ControllerConfig(heartbeat_expiration=30).sweep_interval == 1.0
    assert ControllerConfig(heartbeat_expiration=2).sweep_interval == pytest.approx(0.2)


def test_gateway_config_refuses_an_unknown_routing_policy() -> None:
    assert GatewayConfig(routing_policy="prefix_aware").routing_policy == "prefix_aware"
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'; choose one of"):
        GatewayConfig(routing_policy="fastest")


# -- the prefix index --------------------------------------------------------------------------

SYSTEM = "You are a helpful assistant who answers in full sentences. " * 8  # 480 chars


def test_block_keys_chain_over_full_blocks_and_the_model() -> None:
    question = "What is the capital of France, and why did it become the capital?"
    a = block_keys("m", SYSTEM + question)
    b = block_keys("m", SYSTEM + "How far is the moon from here, and how long would it take?")
    assert len(a) == len(SYSTEM + question) // BLOCK_CHARS
    shared = len(SYSTEM) // BLOCK_CHARS
    assert a[:shared] == b[:shared] and a[shared] != b[shared]  # the block holding the question
    assert block_keys("other", SYSTEM)[0] != a[0]  # another model's cache is another cache
    # a changed first block changes every key after it: keys name prefixes, not blocks
    assert set(block_keys("m", "X" + SYSTEM[1:])).isdisjoint(block_keys("m", SYSTEM))
    ids = list(range(40))
    assert len(block_keys("m", ids)) == 40 // BLOCK_TOKENS
    assert block_keys("m", "short") == []


def test_cached_tokens_count_each_workers_run_of_leading_blocks() -> None:
    index = PrefixIndex()
    keys = block_keys("m", SYSTEM + "x" * 200)
    index.record(keys[:3], "a")
    index.record(keys, "b")
    index.record(keys[1:], "c")  # without the first block, nothing of it can be reused
    got = index.cached_tokens(keys, ["a", "b", "c", "d"])
    assert got == {"a": 3 * BLOCK_TOKENS, "b": len(keys) * BLOCK_TOKENS, "c": 0, "d": 0}


def test_the_index_is_bounded_and_forgets_a_chains_tail_before_its_head() -> None:
    index = PrefixIndex(max_blocks=10)
    old = block_keys("m", "o" * BLOCK_CHARS * 8)
    index.record(old, "a")
    new = block_keys("m", "n" * BLOCK_CHARS * 4)
    index.record(new, "b")
    assert len(index) == 10
    assert index.cached_tokens(new, ["b"]) == {"b": 4 * BLOCK_TOKENS}
    assert index.cached_tokens(old, ["a"]) == {"a": 6 * BLOCK_TOKENS}  # its last 2 went first
    with pytest.raises(ValueError, match="max_blocks"):
        PrefixIndex(max_blocks=0)


# -- prefix-aware routing and sessions ---------------------------------------------------------


def test_prefix_aware_sends_a_shared_prefix_where_it_is_cached() -> None:
    policy = PrefixAware()
    workers = [w(1), w(2)]
    first = policy.select(workers, RouteRequest("m", SYSTEM + "Question one?"))
    assert first.cached_tokens == 0
    for question in ("Question two?", "Another one entirely?", "And a third?"):
        route = policy.select(workers, RouteRequest("m", SYSTEM + question))
        assert route.worker.worker_id == first.worker.worker_id
        assert route.cached_tokens == len(SYSTEM) // BLOCK_CHARS * BLOCK_TOKENS
        assert route.header() == (
            f"policy=prefix_aware; worker={first.worker.worker_id}; "
            f"cached_tokens={route.cached_tokens}"
        )
    # without a prompt, or with nothing cached, it is least-load
    busy, idle = w(1, queue_length=3), w(2)
    assert pick(policy, [busy, idle]).worker_id == "2"
    assert pick(policy, [busy, idle], prompt="a fresh prompt " * 20).worker_id == "2"


def test_a_hot_prefix_spills_to_another_worker_instead_of_piling_up() -> None:
    """The death spiral of cache-aware routing (SGLang PR #14305): every request for a hot
    prefix sent to the one worker that holds it. Here the load grows with each dispatch and the
    prefix must spread once the holder is busier than the prefix is worth."""
    policy = PrefixAware(request_tokens=64)
    workers = [w(1), w(2)]
    picks = []
    for i in range(40):
        chosen = pick(policy, workers, prompt=SYSTEM + f"user {i}")
        chosen.dispatched += 1  # as the controller counts what it sent
        picks.append(chosen.worker_id)
    counts = Counter(picks)
    assert set(counts) == {"1", "2"}
    cached = len(SYSTEM) // BLOCK_CHARS * BLOCK_TOKENS
    assert abs(counts["1"] - counts["2"]) <= cached / 64 + 1  # imbalance bounded by its worth


def test_sessions_stick_to_their_worker_until_it_is_gone_or_far_busier() -> None:
    policy = LeastLoad(session_spill=2)
    a, b = w(1), w(2)
    home = pick(policy, [a, b], session_id="s1")
    for turn in range(5):  # other traffic makes home look busier, within the spill
        home.dispatched = 1 + turn % 2
        route = policy.select([a, b], RouteRequest("m", f"turn {turn}", "s1"))
        assert route.worker is home and route.sticky
    home.dispatched = 5  # far busier than the other: the session moves, and stays moved
    moved = pick(policy, [a, b], session_id="s1")
    assert moved is not home
    home.dispatched = 0
    assert pick(policy, [a, b], session_id="s1") is moved
    assert pick(policy, [home], session_id="s1") is home  # its worker gone: rebinds


# -- the controller's per-model view, at scale ---------------------------------------------------


def test_least_load_compares_two_drawn_workers_in_a_large_pool() -> None:
    from pagedserve.controller.worker_index import WorkerIndex

    index = WorkerIndex(w(i, queue_length=i % 5) for i in range(1, 1001))
    compared: list[float] = []

    class Counting(LeastLoad):
        def cost(self, worker: WorkerInfo) -> float:
            compared.append(super().cost(worker))
            return compared[-1]

    policy = Counting(seed=1)
    picks = Counter()
    for _ in range(2000):
        compared.clear()
        chosen = pick(policy, index.candidates("m"))
        assert len(compared) == 2 and policy.cost(chosen) == min(compared[:2])
        chosen.dispatched += 1
        picks[chosen.worker_id] += 1
    # two choices keep the busiest worker within a few requests of the mean (2 per worker)
    assert max(picks.values()) <= 6


def test_round_robin_indexes_the_ordered_pool_without_sorting_it() -> None:
    from pagedserve.controller.worker_index import WorkerIndex

    index = WorkerIndex([w(3), w(1), w(2)])
    policy = RoundRobin()
    picks = [pick(policy, index.candidates("m")).worker_id for _ in range(6)]
    assert picks == ["1", "2", "3", "1", "2", "3"]


def test_the_view_follows_register_drain_heartbeat_and_remove() -> None:
    import asyncio

    import httpx

    from pagedserve.controller.metrics import ControllerMetrics
    from pagedserve.controller.registry import Controller
    from pagedserve.controller.store import MemoryStore
    from pagedserve.protocol.registry import HeartbeatRequest, RegisterWorkerRequest

    async def scenario() -> None:
        store = MemoryStore()
        async with httpx.AsyncClient() as client:
            ctl = Controller(ControllerConfig(), store, LeastLoad(), client, ControllerMetrics())
            for i in range(200):
                status = {"model_names": ["m", "n"] if i % 2 else ["m"], "worker_id": f"w{i}"}
                await ctl.register(
                    RegisterWorkerRequest(worker_name=f"http://10.0.0.{i}:1", worker_status=status)
                )

            async def no_listing():
                raise AssertionError("dispatch listed every worker")

            store.list = no_listing  # dispatch and /list_models must not list the store
            pool = store.view.candidates("m")
            assert len(pool) == 200 and len(store.view.candidates("n")) == 100
            names = [x.worker_name for x in pool]
            assert names == sorted(names)
            assert await ctl.list_models() == ["m", "n"]
            assert (await ctl.select(RouteRequest("m"))) is not None

            await ctl.heartbeat(
                HeartbeatRequest(worker_name="http://10.0.0.1:1", queue_length=7, state="draining")
            )
            assert pool.find("w1") is None and len(store.view.candidates("n")) == 99
            await ctl.heartbeat(
                HeartbeatRequest(worker_name="http://10.0.0.1:1", queue_length=3, state="ready")
            )
            assert pool.find("w1").queue_length == 3 and len(pool) == 200
            await store.update("http://10.0.0.3:1", {"drain_requested": True})
            assert pool.find("w3") is None
            await ctl.unregister("http://10.0.0.5:1")
            assert pool.find("w5") is None and len(pool) == 198
            names = [x.worker_name for x in pool]
            assert names == sorted(names)
            for i in range(0, 200, 2):
                await ctl.unregister(f"http://10.0.0.{i}:1")
            assert await ctl.list_models() == ["m", "n"]
            for i in range(1, 200, 2):
                await ctl.unregister(f"http://10.0.0.{i}:1")
            assert await ctl.list_models() == [] and await ctl.select(RouteRequest("m")) is None

    asyncio.run(scenario())


def test_idle_workers_take_turns_whatever_small_difference_a_stale_report_shows() -> None:
    """A worker reported a few KV blocks in use a moment ago: the idle pair still alternates
    (costs within tie_band are a tie) instead of every request going to the other one."""
    for policy in (LeastLoad(), PrefixAware()):
        workers = [w(1, kv_usage=0.002), w(2)]
        assert [pick(policy, workers).worker_id for _ in range(4)] == ["1", "2", "1", "2"]
        workers = [w(1, kv_usage=0.5), w(2)]  # a real difference still counts
        assert {pick(policy, workers).worker_id for _ in range(4)} == {"2"}
    with pytest.raises(ValueError, match="tie_band"):
        LeastLoad(tie_band=-1)
