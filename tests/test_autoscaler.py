"""The autoscaler's decisions, driven by a fake clock and fake controller views: no process."""

from __future__ import annotations

from typing import Any

import pytest

from pagedserve.deploy.autoscaler import Autoscaler, TtftMeter, parse_totals
from pagedserve.deploy.stack_config import AutoscaleSection
from pagedserve.deploy.supervisor import ManagedReplica, ModelGroup

TICK = 0.5


class Fleet:
    """A model's replicas as the supervisor would hold them, and the load the controller
    reports for them; `run` steps the clock and applies each decision at once."""

    def __init__(self, replicas: int, **autoscale: Any) -> None:
        self.spec = AutoscaleSection(**autoscale)
        self.scaler = Autoscaler(self.spec)
        self.group = ModelGroup(spec=None, target=0)  # type: ignore[arg-type]
        self.now = 0.0
        self.moves: list[tuple[float, int]] = []
        self.resize(replicas)

    def resize(self, n: int) -> None:
        self.group.target = n
        self.group.replicas = {f"m-{i}": ManagedReplica(f"m-{i}", "m", state="ready")
                               for i in range(n)}  # fmt: skip

    def workers(self, work_per_replica: float, kv: float = 0.1) -> list[dict[str, Any]]:
        n = len(self.group.replicas)
        total = round(work_per_replica * n)
        return [
            {"worker_id": rid, "queue_length": 0, "running": total // n + (i < total % n),
             "waiting": 0, "kv_usage": kv, "status": "ready"}
            for i, rid in enumerate(self.group.replicas)
        ]  # fmt: skip

    def run(self, seconds: float, load: Any, kv: float = 0.1) -> None:
        """`load` is work per replica, or a function of the time."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now += TICK
            per_replica = load(self.now) if callable(load) else load
            want = self.scaler.decide(self.now, self.group, self.workers(per_replica, kv))
            if want is not None:
                self.moves.append((self.now, want))
                self.resize(want)

    @property
    def replicas(self) -> int:
        return self.group.target


def test_step_load_scales_up_after_up_after_not_before() -> None:
    fleet = Fleet(1, min_replicas=1, max_replicas=4, target_queue=4, up_after=5, cooldown=0)
    fleet.run(4.5, load=10)
    assert fleet.replicas == 1, "scaled up before up_after"
    fleet.run(1.0, load=10)
    assert fleet.moves == [(5.5, 3)], "by what the load calls for: ceil(10 / 4)"


def test_spike_shorter_than_up_after_does_not_scale() -> None:
    fleet = Fleet(1, min_replicas=1, max_replicas=4, up_after=5, cooldown=0)
    fleet.run(4.0, load=20)
    fleet.run(30.0, load=1)
    assert fleet.moves == []


def test_kv_usage_alone_scales_up_by_one() -> None:
    fleet = Fleet(2, min_replicas=1, max_replicas=4, target_kv_usage=0.8, up_after=2, cooldown=0)
    fleet.run(3.0, load=1, kv=0.95)
    assert fleet.moves[0] == (2.5, 3)


def test_idle_scales_down_one_at_a_time_with_cooldown() -> None:
    fleet = Fleet(3, min_replicas=1, max_replicas=3, down_after=10, cooldown=4)
    fleet.run(9.5, load=0)
    assert fleet.replicas == 3, "scaled down before down_after"
    fleet.run(20.0, load=0)
    assert fleet.moves == [(10.5, 2), (14.5, 1)]  # load first seen at 0.5


def test_bounds_are_honoured() -> None:
    fleet = Fleet(2, min_replicas=2, max_replicas=3, up_after=1, down_after=1, cooldown=0)
    fleet.run(20.0, load=100)
    assert fleet.replicas == 3
    fleet.run(20.0, load=0)
    assert fleet.replicas == 2
    outside = Fleet(5, min_replicas=1, max_replicas=3)
    outside.run(TICK, load=2)
    assert outside.moves == [(TICK, 3)], "a count outside the bounds is brought in at once"


def test_scales_to_zero_only_when_idle_and_allowed() -> None:
    fleet = Fleet(1, min_replicas=0, max_replicas=2, down_after=10, cooldown=0)
    fleet.run(30.0, load=1)  # some work, well under half the target: not idle
    assert fleet.replicas == 1
    fleet.run(9.5, load=0)
    assert fleet.replicas == 1
    fleet.run(1.0, load=0)
    assert fleet.replicas == 0
    fleet.run(30.0, load=0)
    assert fleet.moves == [(40.5, 0)], "asleep, it stays so until woken"
    kept = Fleet(1, min_replicas=1, max_replicas=2, down_after=1, cooldown=0)
    kept.run(30.0, load=0)
    assert kept.moves == []


def test_woken_model_waits_a_cooldown_before_moving_again() -> None:
    fleet = Fleet(1, min_replicas=0, max_replicas=2, down_after=2, cooldown=20)
    fleet.scaler.woken(0.0)
    fleet.run(15.0, load=0)
    assert fleet.replicas == 1, "put back to sleep within the cooldown of its wake"
    fleet.run(10.0, load=0)
    assert fleet.replicas == 0


def test_no_flapping_under_load_oscillating_around_the_target() -> None:
    fleet = Fleet(2, min_replicas=1, max_replicas=4, target_queue=4, up_after=5, down_after=10,
                  cooldown=5)  # fmt: skip

    def around(t: float) -> float:
        return 5.0 if int(t / 2) % 2 else 3.0  # 25% over, then 25% under, each 2 s

    fleet.run(300.0, load=around)
    assert fleet.moves == []


def test_starting_replica_holds_decisions() -> None:
    fleet = Fleet(1, min_replicas=1, max_replicas=4, up_after=1, cooldown=0)
    fleet.run(2.0, load=10)
    assert fleet.replicas == 3
    fleet.group.replicas["m-2"].state = "starting"
    fleet.scaler.decide(10.0, fleet.group, fleet.workers(50))
    assert fleet.scaler.decide(20.0, fleet.group, fleet.workers(50)) is None


def test_missing_view_decides_nothing() -> None:
    fleet = Fleet(1, min_replicas=0, max_replicas=2, down_after=1, cooldown=0)
    for t in range(1, 20):
        assert fleet.scaler.decide(float(t), fleet.group, []) is None


def test_ttft_signal_scales_up() -> None:
    fleet = Fleet(1, min_replicas=1, max_replicas=2, target_ttft=1.0, up_after=2, cooldown=0)
    fleet.scaler.ttft.update({"m-0": (10.0, 10.0)})
    fleet.scaler.ttft.update({"m-0": (40.0, 20.0)})  # 10 first tokens, 3 s each
    fleet.run(3.0, load=1)
    assert fleet.replicas == 2


def test_ttft_meter_reads_the_change_between_looks() -> None:
    meter = TtftMeter()
    meter.update({"a": (5.0, 10.0)})
    assert meter.mean is None, "one look tells nothing recent"
    meter.update({"a": (7.0, 14.0), "b": (1.0, 1.0)})
    assert meter.mean == pytest.approx(0.5)
    meter.update({"a": (1.0, 1.0), "b": (1.0, 1.0)})  # a restarted
    assert meter.mean == pytest.approx(1.0)


def test_parse_totals() -> None:
    page = (
        "# HELP pagedserve_worker_time_to_first_token_seconds x\n"
        'pagedserve_worker_time_to_first_token_seconds_bucket{le="0.1"} 3.0\n'
        "pagedserve_worker_time_to_first_token_seconds_count 4.0\n"
        "pagedserve_worker_time_to_first_token_seconds_sum 1.25\n"
    )
    assert parse_totals(page) == (1.25, 4.0)
    assert parse_totals("nothing here\n") is None
