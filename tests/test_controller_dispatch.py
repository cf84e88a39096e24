"""Dispatch policies and the controller's configuration, tested alone (no processes)."""

from __future__ import annotations

from collections import Counter

import pytest

from pagedserve.controller.config import ControllerConfig
from pagedserve.controller.dispatch import LeastLoad, Lottery, RoundRobin, make_policy
from pagedserve.controller.protocol import WorkerInfo


def w(port: int, **fields) -> WorkerInfo:
    return WorkerInfo(
        worker_name=f"http://127.0.0.1:{port}", worker_id=str(port), model_names=["m"], **fields
    )


def test_round_robin_cycles_in_name_order_per_model() -> None:
    policy = RoundRobin()
    workers = [w(3), w(1), w(2)]
    picks = [policy.select(workers, "m").worker_name[-1] for _ in range(6)]
    assert picks == ["1", "2", "3", "1", "2", "3"]
    assert policy.select(workers, "other").worker_name.endswith(":1")  # its own counter
    assert policy.select([], "m") is None


def test_least_load_picks_the_shortest_queue_per_speed() -> None:
    policy = LeastLoad()
    assert policy.select([w(1, queue_length=5), w(2, queue_length=1)], "m").worker_id == "2"
    # twice as fast: 6/2 = 3 < 4
    assert (
        policy.select([w(1, queue_length=6, speed=2), w(2, queue_length=4)], "m").worker_id == "1"
    )


def test_least_load_counts_requests_dispatched_since_the_heartbeat() -> None:
    policy = LeastLoad()
    a, b = w(1, queue_length=2), w(2, queue_length=0)
    picks = []
    for _ in range(6):  # the controller counts each dispatch on the chosen worker
        chosen = policy.select([a, b], "m")
        chosen.dispatched += 1
        picks.append(chosen.worker_id)
    assert picks[:2] == ["2", "2"]  # b catches up with a's reported queue first
    assert Counter(picks[2:]) == {"1": 2, "2": 2}  # then they alternate


def test_least_load_weighs_kv_cache_use() -> None:
    policy = LeastLoad(kv_weight=1.0)
    assert policy.select([w(1, kv_usage=0.9), w(2, kv_usage=0.1)], "m").worker_id == "2"
    # a full cache weighs as much as one queued request
    assert (
        policy.select([w(1, kv_usage=0.0, queue_length=2), w(2, kv_usage=1.0)], "m").worker_id
        == "2"
    )
    with pytest.raises(ValueError, match="kv_weight"):
        LeastLoad(kv_weight=-1)


def test_least_load_ties_go_round_robin() -> None:
    policy = LeastLoad()
    workers = [w(1), w(2)]
    assert [policy.select(workers, "m").worker_id for _ in range(4)] == ["1", "2", "1", "2"]


def test_lottery_follows_speed_and_skips_speed_zero() -> None:
    policy = Lottery(seed=0)
    picks = Counter(
        policy.select([w(1, speed=3), w(2, speed=1), w(3, speed=0)], "m").worker_id
        for _ in range(400)
    )
    assert picks["3"] == 0
    assert 240 < picks["1"] < 360
    assert policy.select([w(3, speed=0)], "m") is None


def test_fastchat_dispatch_names_are_accepted() -> None:
    assert isinstance(make_policy("shortest_queue"), LeastLoad)
    assert isinstance(make_policy("lottery"), Lottery)
    assert isinstance(make_policy("least_load"), LeastLoad)
    assert isinstance(make_policy("round_robin"), RoundRobin)
    with pytest.raises(ValueError, match="least_load, round_robin"):
        make_policy("fastest")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dispatch_method": "random"}, "dispatch_method"),
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
