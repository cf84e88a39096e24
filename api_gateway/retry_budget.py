"""A retry budget: retries may add at most `ratio` of the requests of the last `window`
seconds, plus `min_per_second` (so that a quiet gateway can still retry). When many workers
fail at once this stops retries from multiplying the load on the ones left."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RetryBudget:
    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self.clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _expire(self, now: float) -> None:
        for times in (self._requests, self._retries):
            while times and times[0] <= now - self.window:
                times.popleft()

    def record_request(self) -> None:
        now = self.clock()
        self._expire(now)
        self._requests.append(now)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        now = self.clock()
        self._expire(now)
        allowed = self.ratio * len(self._requests) + self.min_per_second * self.window
        if len(self._retries) + 1 > allowed:
            return False
        self._retries.append(now)
        return True
