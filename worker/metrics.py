"""The worker's Prometheus metrics, on a registry of their own (one per app).

Engine figures (requests running and waiting, KV blocks, token totals, tokens/s) are read from
`engine.stats()` at scrape time, so they are never stale; request timings are histograms
observed as requests finish.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], object | None], state: Callable[[], str]) -> None:
        self._stats = stats
        self._state = state
        self._last: tuple[float, int] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        ready = GaugeMetricFamily("pagedserve_worker_ready", "1 when the worker takes requests.")
        ready.add_metric([], 1.0 if self._state() == "ready" else 0.0)
        yield ready
        s = self._stats()
        if s is None:  # engine still loading
            return
        gauges = {
            "pagedserve_worker_requests_running": (
                "Requests the engine is running.",
                s.num_running,
            ),
            "pagedserve_worker_requests_waiting": (
                "Requests waiting for KV blocks.",
                s.num_waiting,
            ),
            "pagedserve_worker_kv_blocks_used": ("KV-cache blocks in use.", s.num_blocks_used),
            "pagedserve_worker_kv_blocks_total": ("KV-cache blocks in all.", s.num_blocks_total),
            "pagedserve_worker_kv_cache_usage": ("Fraction of KV blocks in use.", s.kv_cache_usage),
            # What the engine measures offline, live: the PagedAttention paper's waste (slots
            # allocated to sequences that hold no token: the unfilled tail of each last block).
            "pagedserve_worker_kv_cache_waste": (
                "Fraction of allocated KV slots that hold no token.",
                s.kv_waste,
            ),
            "pagedserve_worker_kv_blocks_shared": (
                "KV blocks referenced by more than one sequence (copy-on-write sharing: "
                "parallel samples, beams, prefix-cache hits).",
                s.num_blocks_shared,
            ),
            "pagedserve_worker_kv_blocks_cached": (
                "KV blocks whose content the prefix cache can hand out.",
                s.num_blocks_cached,
            ),
            # vLLM v0's gpu_prefix_cache_hit_rate: hits over lookups, in prompt tokens, since start.
            "pagedserve_worker_prefix_cache_hit_rate": (
                "Prompt tokens found in the prefix cache over those looked up, since start.",
                s.prefix_cache_hit_rate,
            ),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        for name, doc, value in (
            ("pagedserve_worker_prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total),
            ("pagedserve_worker_generation_tokens", "Tokens generated.", s.generation_tokens_total),
            (
                "pagedserve_worker_preemptions",
                "Requests preempted for KV blocks.",
                s.num_preemptions,
            ),
            # vLLM's prefix_cache_queries and prefix_cache_hits: prompt tokens looked up in the
            # prefix cache, and those found (what routing's cached_tokens estimates).
            (
                "pagedserve_worker_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_cache_queried_tokens,
            ),
            (
                "pagedserve_worker_prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                s.prefix_cache_hit_tokens,
            ),
            (
                "pagedserve_worker_kv_cow_copies",
                "Shared KV blocks copied before a sequence wrote into them (copy-on-write).",
                s.num_cow_copies,
            ),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(value))
            yield c
        now, total = time.monotonic(), s.generation_tokens_total
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = (total - self._last[1]) / (now - self._last[0])
        self._last = (now, total)
        g = GaugeMetricFamily(
            "pagedserve_worker_generation_tokens_per_second",
            "Tokens generated per second since the previous scrape.",
        )
        g.add_metric([], rate)
        yield g


class WorkerMetrics:
    def __init__(self, stats: Callable[[], object | None], state: Callable[[], str]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, state))
        self.requests = Counter(
            "pagedserve_worker_requests_total",
            "Engine requests by route and outcome (ok, aborted, error), and requests refused "
            "before they started (bad_request, unavailable).",
            ["route", "outcome"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "pagedserve_worker_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "pagedserve_worker_request_latency_seconds",
            "From a request's arrival to its last token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
