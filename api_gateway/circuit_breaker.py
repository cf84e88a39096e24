"""A circuit breaker per worker: after `threshold` failures in a row the worker is skipped for
`cooldown` seconds; then one trial request may go (half-open): success closes the circuit,
failure opens it again. 4xx answers are not failures: the caller reports neither."""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(
        self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._trial = False  # a half-open trial request is in flight

    def available(self) -> bool:
        """May a request be sent now? (No side effect: call `begin` for the one chosen.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return self.clock() >= self.opened_at + self.cooldown
        return not self._trial

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a trial through."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - self.clock())

    def begin(self) -> None:
        if self.state == OPEN and self.available():
            self.state = HALF_OPEN
        if self.state == HALF_OPEN:
            self._trial = True

    def success(self) -> None:
        self.state, self.failures, self._trial = CLOSED, 0, False

    def failure(self) -> bool:
        """Record a failure; True if this opened the circuit."""
        self._trial = False
        self.failures += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.threshold):
            self.state, self.opened_at = OPEN, self.clock()
            return True
        return False

    def cancel(self) -> None:
        """The request ended without a verdict (client gone): free the trial slot."""
        self._trial = False


class CircuitBreakers:
    """One breaker per worker id, made on first use."""

    def __init__(
        self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def __getitem__(self, worker_id: str) -> CircuitBreaker:
        breaker = self._breakers.get(worker_id)
        if breaker is None:
            breaker = CircuitBreaker(self.threshold, self.cooldown, self.clock)
            self._breakers[worker_id] = breaker
        return breaker

    def keep_only(self, worker_ids: set[str]) -> None:
        """Forget the breakers of workers that left the registry."""
        for gone in set(self._breakers) - worker_ids:
            del self._breakers[gone]

    def open_count(self) -> int:
        return sum(b.state != CLOSED for b in self._breakers.values())
