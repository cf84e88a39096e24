"""Dispatch policies: which of the workers serving a model gets the next request.

Every policy is a small object behind one method, `select(workers, model) -> worker | None`.
The controller hands it only workers that serve `model` and accept requests (ready, not
draining, healthy); the policy only chooses.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

from pagedserve.controller.protocol import WorkerInfo


class DispatchPolicy(Protocol):
    name: str

    def select(self, workers: Sequence[WorkerInfo], model: str) -> WorkerInfo | None: ...


class RoundRobin:
    """Each model's workers in turn (ordered by name, so the order survives re-listing)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count] = defaultdict(itertools.count)

    def select(self, workers: Sequence[WorkerInfo], model: str) -> WorkerInfo | None:
        if not workers:
            return None
        ordered = sorted(workers, key=lambda w: w.worker_name)
        return ordered[next(self._counters[model]) % len(ordered)]


class LeastLoad:
    """The worker with the least load per unit of speed, counting what it reported in its last
    heartbeat (requests running and waiting, KV-cache use) plus the requests sent its way since.

    score = (queue_length + dispatched) / speed + kv_weight * kv_usage

    FastChat's `shortest_queue` is this policy with kv_weight = 0 and no dispatched count; the
    dispatched count is what makes a burst between two heartbeats spread out. Ties go round
    robin.
    """

    name = "least_load"

    def __init__(self, kv_weight: float = 1.0) -> None:
        if kv_weight < 0:
            raise ValueError(f"kv_weight must be >= 0; got {kv_weight}")
        self.kv_weight = kv_weight
        self._tie_break = RoundRobin()

    def score(self, w: WorkerInfo) -> float:
        return (w.queue_length + w.dispatched) / max(w.speed, 1) + self.kv_weight * w.kv_usage

    def select(self, workers: Sequence[WorkerInfo], model: str) -> WorkerInfo | None:
        if not workers:
            return None
        best = min(self.score(w) for w in workers)
        tied = [w for w in workers if self.score(w) - best < 1e-9]
        return self._tie_break.select(tied, model)


class Lottery:
    """FastChat's `lottery`: a random worker, weighted by its speed."""

    name = "lottery"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, workers: Sequence[WorkerInfo], model: str) -> WorkerInfo | None:
        weighted = [w for w in workers if w.speed > 0]
        if not weighted:
            return None
        return self._rng.choices(weighted, weights=[w.speed for w in weighted])[0]


_POLICIES = {
    "least_load": LeastLoad,
    "round_robin": RoundRobin,
    "lottery": Lottery,
    "shortest_queue": LeastLoad,  # FastChat's name for queue-length dispatch
}
DISPATCH_METHODS = tuple(_POLICIES)


def make_policy(method: str) -> DispatchPolicy:
    try:
        return _POLICIES[method]()
    except KeyError:
        raise ValueError(
            f"unknown dispatch method {method!r}; choose one of {', '.join(DISPATCH_METHODS)}"
        ) from None
