"""The gateway's Prometheus metrics, on a registry of their own (one per app).

The `model` label only takes names the routing view knows (others count as "-"), so that
clients cannot grow the label set by inventing model names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160,
)  # fmt: skip


class _Gauges(Collector):
    def __init__(self, read: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (doc, value) in self._read().items():
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g


class GatewayMetrics:
    def __init__(self, gauges: Callable[[], dict[str, tuple[str, float]]] | None = None) -> None:
        self.registry = CollectorRegistry()
        if gauges is not None:
            self.registry.register(_Gauges(gauges))
        self.requests = Counter(
            "pagedserve_gateway_requests_total",
            "Requests answered, by route, model and HTTP status.",
            ["route", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pagedserve_gateway_request_latency_seconds",
            "From a request's arrival to its last byte (streams included).",
            ["route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "pagedserve_gateway_time_to_first_token_seconds",
            "From a streamed request's arrival to its first byte from the worker.",
            ["route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "pagedserve_gateway_prompt_tokens_total",
            "Prompt tokens of answered requests (estimated for streams without usage).",
            ["model"],
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "pagedserve_gateway_completion_tokens_total",
            "Tokens generated for answered requests (estimated for streams without usage).",
            ["model"],
            registry=self.registry,
        )
        self.retries = Counter(
            "pagedserve_gateway_retries_total",
            "Requests sent again to another worker after one failed before the first byte.",
            ["model", "reason"],
            registry=self.registry,
        )
        self.worker_failures = Counter(
            "pagedserve_gateway_worker_failures_total",
            "Failures of workers before the first byte (connection, timeout, 5xx), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.prefix_routes = Counter(
            "pagedserve_gateway_prefix_routes_total",
            "Routed requests, by whether the chosen worker was expected to hold some of the "
            "prompt's prefix in its cache (hit) or not (miss).",
            ["model", "result"],
            registry=self.registry,
        )
        self.resumed_streams = Counter(
            "pagedserve_gateway_resumed_streams_total",
            "Streams whose worker failed after the first byte, by outcome: resumed on another "
            "worker, or failed (no worker, or a request that cannot be resumed).",
            ["model", "result"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "pagedserve_gateway_rate_limited_total",
            "Requests refused by a limit: rpm, tpm, key_concurrency, total_concurrency.",
            ["limit"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
