"""The controller's Prometheus metrics, on a registry of their own (one per app)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from pagedserve.protocol.registry import WorkerInfo


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.workers = Gauge(
            "pagedserve_controller_workers",
            "Registered workers by state (ready, draining, unready).",
            ["status"],
            registry=self.registry,
        )
        self.model_workers = Gauge(
            "pagedserve_controller_model_workers",
            "Workers accepting requests, per model.",
            ["model"],
            registry=self.registry,
        )
        self.registrations = Counter(
            "pagedserve_controller_registrations_total",
            "Worker registrations accepted.",
            registry=self.registry,
        )
        self.heartbeats = Counter(
            "pagedserve_controller_heartbeats_total",
            "Heartbeats received, by whether the worker was known.",
            ["known"],
            registry=self.registry,
        )
        self.dispatches = Counter(
            "pagedserve_controller_dispatch_total",
            "Worker selections per model, by outcome (ok or no_worker).",
            ["model", "result"],
            registry=self.registry,
        )
        self.prefix_routes = Counter(
            "pagedserve_controller_prefix_routes_total",
            "Routed requests with a prompt, by whether the chosen worker was expected to hold "
            "some of its prefix in cache (hit) or not (miss).",
            ["model", "result"],
            registry=self.registry,
        )
        self.removals = Counter(
            "pagedserve_controller_removed_workers_total",
            "Workers removed from the registry, by reason.",
            ["reason"],
            registry=self.registry,
        )

    def observe_registry(self, workers: Iterable[WorkerInfo]) -> None:
        workers = list(workers)
        states = Tally(w.effective_state for w in workers)
        for status in ("ready", "draining", "unready"):
            self.workers.labels(status).set(states.get(status, 0))
        per_model = Tally(m for w in workers if w.accepting for m in set(w.model_names))
        self.model_workers.clear()
        for model, n in per_model.items():
            self.model_workers.labels(model).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
