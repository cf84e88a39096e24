"""How many replicas a model wants, from the controller's live view of its workers.

Three signals, each against its target in the stack file's `autoscale:` section:
- the work per replica: requests queued, running or waiting, summed over the model's workers,
  divided by those that accept requests;
- the KV cache in use, the mean over those workers;
- with `target_ttft`, the recent mean time to first token: the change of each ready replica's
  `pagedserve_worker_time_to_first_token_seconds` _sum over its _count between two looks at its
  /metrics (at most one look every `TTFT_SCRAPE_INTERVAL` s, in the background).

One rule with hysteresis: up when ANY signal stays over its target for `up_after` seconds, by
as many replicas as the work calls for (at least one); down by one when ALL stay under half
their target for `down_after` seconds; to zero (with `min_replicas: 0`) once the model has had
no work at all for `down_after` seconds. Between two moves `cooldown` seconds pass, and no
move is decided while a replica is starting (the capacity it brings is not measured yet).

`decide` reads no clock and sends nothing itself (the TTFT looks run as tasks, whose result
the next decision reads), so tests drive it with a fake clock and fake worker lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any

import httpx

from pagedserve.deploy.stack_config import AutoscaleSection

if TYPE_CHECKING:
    from pagedserve.deploy.supervisor import ModelGroup

logger = logging.getLogger(__name__)

TTFT_METRIC = "pagedserve_worker_time_to_first_token_seconds"
TTFT_SCRAPE_INTERVAL = 2.0  # seconds between looks at the replicas' /metrics


class TtftMeter:
    """The recent mean time to first token over a model's replicas, from their histograms'
    totals at two looks (a replica seen for the first time, or restarted, adds nothing yet)."""

    def __init__(self) -> None:
        self.mean: float | None = None  # None: no first token in the last interval
        self.looked_at = -math.inf
        self._totals: dict[str, tuple[float, float]] = {}  # replica -> (sum, count)
        self._task: asyncio.Task[None] | None = None

    def update(self, totals: dict[str, tuple[float, float]]) -> None:
        seconds = count = 0.0
        for replica, (s, c) in totals.items():
            last_s, last_c = self._totals.get(replica, (s, c))
            if c < last_c:  # restarted: its counters began again
                last_s, last_c = 0.0, 0.0
            seconds, count = seconds + s - last_s, count + c - last_c
        self._totals = totals
        self.mean = seconds / count if count > 0 else None

    def look_soon(self, now: float, client: httpx.AsyncClient, addresses: dict[str, str]) -> None:
        """Start a look at the replicas' /metrics if one is due and none is under way."""
        if now - self.looked_at < TTFT_SCRAPE_INTERVAL or self._task is not None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a unit test): the signal stays what it was
        self.looked_at = now
        self._task = asyncio.ensure_future(self._look(client, addresses))
        self._task.add_done_callback(lambda _: setattr(self, "_task", None))

    async def _look(self, client: httpx.AsyncClient, addresses: dict[str, str]) -> None:
        async def totals(address: str) -> tuple[float, float] | None:
            with contextlib.suppress(httpx.HTTPError):
                reply = await client.get(f"{address}/metrics", timeout=2.0)
                if reply.status_code == 200:
                    return parse_totals(reply.text)
            return None

        ids = list(addresses)
        seen = await asyncio.gather(*(totals(addresses[i]) for i in ids))
        self.update({i: t for i, t in zip(ids, seen, strict=True) if t is not None})


def parse_totals(text: str) -> tuple[float, float] | None:
    """The TTFT histogram's (_sum, _count) in a Prometheus text page, or None if absent."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(TTFT_METRIC + suffix + " "):
                found[suffix] = float(line.split()[1])
    if len(found) < 2:
        return None
    return found["_sum"], found["_count"]


class Autoscaler:
    def __init__(self, spec: AutoscaleSection, client: httpx.AsyncClient | None = None) -> None:
        self.spec = spec
        self.client = client  # for the TTFT looks (only with target_ttft)
        self.ttft = TtftMeter()
        self.last_move = -math.inf
        self.over_since: float | None = None
        self.under_since: float | None = None
        self.idle_since: float | None = None

    def woken(self, now: float) -> None:
        """A request woke the model from zero: a move, so the cooldown starts now."""
        self._moved(now, up=True)

    def decide(self, now: float, group: ModelGroup, workers: list[dict[str, Any]]) -> int | None:
        """The replica count `group` should have now, or None to leave it."""
        spec, current = self.spec, group.target
        bounded = min(max(current, spec.min_replicas), spec.max_replicas)
        if bounded != current:
            self._moved(now, up=bounded > current)
            return bounded
        live = group.live()
        if current == 0:
            return None  # asleep: the gateway wakes it (Supervisor.wake)
        if any(r.state == "starting" for r in live):
            self.over_since = None  # judge the new capacity once it serves
            return None
        ids = {r.replica_id for r in live}
        mine = [w for w in workers if w["worker_id"] in ids]
        if not mine:
            self.over_since = self.under_since = self.idle_since = None
            return None  # no view of its load (controller unreachable, not registered yet)
        if spec.target_ttft is not None and self.client is not None:
            addresses = {r.replica_id: r.handle.address for r in live
                         if r.state == "ready" and r.handle is not None}  # fmt: skip
            self.ttft.look_soon(now, self.client, addresses)

        serving = [w for w in mine if w.get("status", "ready") == "ready"] or mine
        work = sum(w["queue_length"] + w["running"] + w["waiting"] for w in mine)
        queue = work / len(serving)
        kv = sum(w["kv_usage"] for w in serving) / len(serving)
        ttft = self.ttft.mean if spec.target_ttft is not None else None
        loads = [queue / spec.target_queue, kv / spec.target_kv_usage]
        if ttft is not None and spec.target_ttft is not None:
            loads.append(ttft / spec.target_ttft)
        self.over_since = _since(self.over_since, now, max(loads) > 1)
        self.under_since = _since(self.under_since, now, max(loads) < 0.5)
        self.idle_since = _since(self.idle_since, now, work == 0)

        if now - self.last_move < spec.cooldown:
            return None
        if self.over_since is not None and now - self.over_since >= spec.up_after:
            wanted = max(current + 1, math.ceil(work / spec.target_queue))
            return self._move(now, current, min(wanted, spec.max_replicas))
        if current == 1:  # the last one goes only when nothing at all is asked of it
            held = self.idle_since
        else:
            held = self.under_since
        if held is not None and now - held >= spec.down_after:
            return self._move(now, current, max(current - 1, spec.min_replicas))
        return None

    def _move(self, now: float, current: int, wanted: int) -> int | None:
        if wanted == current:
            return None
        self._moved(now, up=wanted > current)
        return wanted

    def _moved(self, now: float, up: bool) -> None:
        self.last_move = now
        if up:  # more capacity: the load is measured afresh; going down, the calm goes on
            self.over_since = self.under_since = self.idle_since = None


def _since(start: float | None, now: float, holds: bool) -> float | None:
    """When a condition began to hold (kept while it holds), or None once it does not."""
    if not holds:
        return None
    return now if start is None else start
