"""Routing policies: which of the workers serving a model gets the next request.

One policy object serves both dispatchers: the gateway (OpenAI traffic, routed in-process)
and the controller's `get_worker_address` (FastChat traffic). Each is handed only workers that
serve the model and accept requests (ready, not draining, healthy) and only chooses:

    policy.select(workers, RouteRequest(model, prompt, session_id)) -> Route | None

What counts as a worker's load differs between the two, so each passes its own measure (`load`:
the requests ahead of a new one on that worker). The controller counts the queue a worker last
reported plus what it dispatched since; the gateway counts what it has in flight there plus the
worker's reported waiting queue.

Every policy also:
- keeps multi-turn sessions sticky (an `x-session-id` header, or the arena's conversation id)
  unless their worker is far busier than the least loaded one, or gone;
- remembers which worker was sent which prompt prefix (`PrefixIndex`), so that each route says
  how many of its prompt's tokens the chosen worker probably has cached. `prefix_aware` is the
  policy that acts on it.

At scale (the controller with thousands of workers of one model) no policy scans the pool:
least_load and prefix_aware compare two workers drawn at random ("power of two choices", near
the exact minimum's balance at O(1)) once a pool has more than `exact_up_to` workers (16), and
keep the exact minimum below; round robin indexes a pool that the controller keeps ordered by
name (`Candidates`), where a plain list is still sorted per call. Lottery stays O(pool).
"""

from __future__ import annotations

import abc
import itertools
import random
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pagedserve.controller.prefix_index import PrefixIndex, Prompt, block_keys
from pagedserve.protocol.registry import WorkerInfo

W = TypeVar("W", bound=WorkerInfo)
# What one queued request weighs in prompt tokens: the exchange rate between load and cached
# prefixes (prefix_aware), where only the number of requests is known (the controller).
REQUEST_TOKENS = 256
# What one generated token costs a worker, in prompt tokens of prefill (batched decode on a CPU
# reads every weight for a handful of tokens; prefill reads them once for hundreds): how the
# gateway, which knows each request's prompt and max_tokens, weighs the work it has sent.
DECODE_TOKEN_COST = 4
ROUTE_HEADER = "x-pagedserve-route"
SESSION_HEADER = "x-session-id"
LoadMeasure = Callable[[WorkerInfo], float]


def reported_load(w: WorkerInfo) -> float:
    """The controller's measure: the queue of its last heartbeat plus what was sent since."""
    return w.queue_length + w.dispatched


class Candidates(Sequence[WorkerInfo]):
    """A model's accepting workers as the controller keeps them (controller/worker_index.py):
    already ordered by worker_name, and found by worker_id in O(1)."""

    @abc.abstractmethod
    def find(self, worker_id: str) -> WorkerInfo | None: ...


@dataclass(frozen=True)
class RouteRequest:
    model: str
    prompt: Prompt | None = None  # text or token ids; None when the caller does not say
    session_id: str | None = None
    max_tokens: int | None = None  # the answer's bound, where the caller knows it


@dataclass(frozen=True)
class Route:
    worker: WorkerInfo
    policy: str
    cached_tokens: int = 0  # prompt tokens the worker is expected to hold in its prefix cache
    sticky: bool = False  # chosen because the session was bound to it

    def header(self) -> str:
        """The value of the x-pagedserve-route response header."""
        return (
            f"policy={self.policy}; worker={self.worker.worker_id}; "
            f"cached_tokens={self.cached_tokens}"
        )


class SessionTable:
    """Session id -> worker id, the least recently used session forgotten past `max_sessions`."""

    def __init__(self, max_sessions: int = 100_000) -> None:
        self.max_sessions = max_sessions
        self._workers: OrderedDict[str, str] = OrderedDict()

    def get(self, session_id: str) -> str | None:
        worker_id = self._workers.get(session_id)
        if worker_id is not None:
            self._workers.move_to_end(session_id)
        return worker_id

    def bind(self, session_id: str, worker_id: str) -> None:
        self._workers[session_id] = worker_id
        self._workers.move_to_end(session_id)
        while len(self._workers) > self.max_sessions:
            self._workers.popitem(last=False)


class RoutingPolicy:
    """What every policy shares: the load measure, session stickiness and the prefix index.
    Subclasses implement `_choose`."""

    name = "base"

    def __init__(
        self,
        load: LoadMeasure = reported_load,
        kv_weight: float = 1.0,
        session_spill: float = 2.0,
        index: PrefixIndex | None = None,
        sessions: SessionTable | None = None,
        exact_up_to: int = 16,
        seed: int | None = None,
        tie_band: float = 0.1,
    ) -> None:
        """kv_weight: how many queued requests a full KV cache weighs as. session_spill: how
        many requests more than the least loaded worker a session's worker may have before the
        session moves. exact_up_to: the largest pool in which every worker is compared; above
        it two drawn at random are."""
        if tie_band < 0:
            raise ValueError(f"tie_band must be >= 0; got {tie_band}")
        if exact_up_to < 2:
            raise ValueError(f"exact_up_to must be >= 2; got {exact_up_to}")
        if kv_weight < 0:
            raise ValueError(f"kv_weight must be >= 0; got {kv_weight}")
        if session_spill < 0:
            raise ValueError(f"session_spill must be >= 0; got {session_spill}")
        self.load = load
        self.kv_weight = kv_weight
        self.session_spill = session_spill
        self.index = index if index is not None else PrefixIndex()
        self.sessions = sessions if sessions is not None else SessionTable()
        self._turns: dict[str, itertools.count] = defaultdict(itertools.count)
        self.exact_up_to = exact_up_to
        # Costs within this many requests of the best are a tie, taken in turn: a stale
        # report's small difference (a few KV blocks) must not send every request to one
        # worker until the next report.
        self.tie_band = tie_band
        self._rng = random.Random(seed)

    def cost(self, w: WorkerInfo) -> float:
        """Requests ahead of a new one, per unit of the worker's speed, plus its KV pressure."""
        return self.load(w) / max(w.speed, 1) + self.kv_weight * w.kv_usage

    def select(self, workers: Sequence[W], request: RouteRequest) -> Route | None:
        if not workers:
            return None
        keys = block_keys(request.model, request.prompt) if request.prompt is not None else []
        cached = self._cached(keys, workers) if keys else {}
        chosen = self._sticky(workers, request)
        sticky = chosen is not None
        if chosen is None:
            chosen = self._choose(workers, request, cached)
        if request.session_id is not None:
            self.sessions.bind(request.session_id, chosen.worker_id)
        if keys:
            self.index.record(keys, chosen.worker_id)
        return Route(chosen, self.name, cached.get(chosen.worker_id, 0), sticky)

    def _sticky(self, workers: Sequence[W], request: RouteRequest) -> W | None:
        if request.session_id is None or not self._uses_sessions(request):
            return None
        worker_id = self.sessions.get(request.session_id)
        if worker_id is None:
            return None
        if isinstance(workers, Candidates):
            bound = workers.find(worker_id)
        else:
            bound = next((w for w in workers if w.worker_id == worker_id), None)
        if bound is None:
            return None
        if self.cost(bound) - min(self.cost(w) for w in self._sample(workers)) > self.session_spill:
            return None  # far busier than another: the session moves
        return bound

    def _cached(self, keys: Sequence[int], workers: Sequence[W]) -> dict[str, int]:
        """Expected cached prompt tokens per worker id; in a large `Candidates` pool only the
        workers that hold the prompt's first block are looked at, not every worker."""
        if isinstance(workers, Candidates) and len(workers) > self.exact_up_to:
            held = self.index.cached_tokens(keys, self.index.holders(keys[0]))
            return {i: t for i, t in held.items() if t and workers.find(i) is not None}
        return self.index.cached_tokens(keys, (w.worker_id for w in workers))

    def _sample(self, workers: Sequence[W]) -> Sequence[W]:
        """Every worker of a small pool; two distinct ones drawn at random from a large one."""
        n = len(workers)
        if n <= self.exact_up_to:
            return workers
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        return [workers[i], workers[j + (j >= i)]]

    def _choose(self, workers: Sequence[W], request: RouteRequest, cached: dict[str, int]) -> W:
        raise NotImplementedError

    def _uses_sessions(self, request: RouteRequest) -> bool:
        return True

    def _round_robin(self, workers: Sequence[W], model: str) -> W:
        """Each model's workers in turn, ordered by name so the order survives re-listing."""
        if isinstance(workers, Candidates):
            ordered: Sequence[W] = workers  # kept ordered by the controller on each change
        else:
            ordered = sorted(workers, key=lambda w: w.worker_name)
        return ordered[next(self._turns[model]) % len(ordered)]


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def _choose(self, workers: Sequence[W], request: RouteRequest, cached: dict[str, int]) -> W:
        return self._round_robin(workers, request.model)


class LeastLoad(RoutingPolicy):
    """The worker with the lowest `cost`; ties go round robin. FastChat's `shortest_queue` is
    this policy with kv_weight = 0 and without the requests dispatched since the heartbeat,
    which are what make a burst between two heartbeats spread out."""

    name = "least_load"

    def _choose(self, workers: Sequence[W], request: RouteRequest, cached: dict[str, int]) -> W:
        sample = self._sample(workers)
        costs = [self.cost(w) for w in sample]
        best = min(costs)
        tied = [w for w, c in zip(sample, costs, strict=True) if c - best <= self.tie_band]
        return self._round_robin(tied, request.model)


class PrefixAware(RoutingPolicy):
    """Least expected work: each worker's cost in requests, at `request_tokens` prompt tokens
    a request, minus the prompt tokens it probably has cached. A hot prefix stays on the
    workers that hold it until they are `cached / request_tokens` requests busier than the
    others, then spills to another worker, which from then on holds it too: no pile-up on an
    overloaded worker. Without a prompt, or with nothing cached, this is least_load."""

    name = "prefix_aware"

    def __init__(self, *args, request_tokens: float = REQUEST_TOKENS, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not request_tokens > 0:
            raise ValueError(f"request_tokens must be > 0; got {request_tokens}")
        self.request_tokens = request_tokens

    def _uses_sessions(self, request: RouteRequest) -> bool:
        """A session's previous turns are a prefix of its prompt: the index knows where they
        are cached and what that is worth against load. The session table only stands in
        where the prompt is not known."""
        return request.prompt is None

    def _choose(self, workers: Sequence[W], request: RouteRequest, cached: dict[str, int]) -> W:
        sample = self._sample(workers)
        if len(sample) < len(workers) and cached:
            # the holders of the prefix compete with the two drawn (cached only names holders
            # in the pool, so this stays O(holders))
            found = (workers.find(i) for i in cached) if isinstance(workers, Candidates) else ()
            sample = [*sample, *(w for w in found if w is not None)]
        costs = [self.cost(w) * self.request_tokens - cached.get(w.worker_id, 0) for w in sample]
        best = min(costs)
        band = self.tie_band * self.request_tokens
        tied = [w for w, c in zip(sample, costs, strict=True) if c - best <= band]
        return self._round_robin(tied, request.model)


class Lottery(RoutingPolicy):
    """FastChat's `lottery`: a random worker, weighted by its speed."""

    name = "lottery"

    def _choose(self, workers: Sequence[W], request: RouteRequest, cached: dict[str, int]) -> W:
        weights = [max(w.speed, 0) for w in workers]
        if not any(weights):
            return self._round_robin(workers, request.model)
        return self._rng.choices(workers, weights=weights)[0]


_POLICIES: dict[str, type[RoutingPolicy]] = {
    "least_load": LeastLoad,
    "round_robin": RoundRobin,
    "prefix_aware": PrefixAware,
    "lottery": Lottery,
    "shortest_queue": LeastLoad,  # FastChat's name for queue-length dispatch
}
ROUTING_POLICIES = tuple(_POLICIES)


def check_policy_name(name: str) -> str:
    if name not in _POLICIES:
        raise ValueError(
            f"unknown routing policy {name!r}; choose one of {', '.join(ROUTING_POLICIES)}"
        )
    return name


def make_policy(name: str, load: LoadMeasure = reported_load) -> RoutingPolicy:
    return _POLICIES[check_policy_name(name)](load=load)
