"""Requests in flight, in total and per API key: over a limit a request is refused at once
(503 in total, 429 for a key), never queued."""

from __future__ import annotations

from collections import Counter

from pagedserve.api_gateway.auth import ApiKey
from pagedserve.api_gateway.errors import GatewayError


class ConcurrencyLimiter:
    def __init__(self, max_total: int) -> None:
        self.max_total = max_total
        self.total = 0
        self._per_key: Counter[str] = Counter()

    def acquire(self, key: ApiKey | None) -> Slot:
        """A slot to release when the request ends (its stream included)."""
        if self.total >= self.max_total:
            raise GatewayError(
                503,
                f"The gateway is serving its maximum of {self.max_total} concurrent requests; "
                "please retry shortly.",
                type="server_error",
                code="overloaded",
                retry_after=1,
            )
        name = key.name if key is not None and key.max_concurrent is not None else None
        if name is not None:
            assert key is not None and key.max_concurrent is not None
            if self._per_key[name] >= key.max_concurrent:
                raise GatewayError(
                    429,
                    f"Key {name!r} already has {key.max_concurrent} requests in flight, its "
                    "limit; wait for one to finish.",
                    type="requests",
                    code="concurrency_limit_exceeded",
                    retry_after=1,
                )
            self._per_key[name] += 1
        self.total += 1
        return Slot(self, name)

    def _release(self, name: str | None) -> None:
        self.total -= 1
        if name is not None:
            self._per_key[name] -= 1
            if not self._per_key[name]:
                del self._per_key[name]


class Slot:
    def __init__(self, limiter: ConcurrencyLimiter, name: str | None) -> None:
        self._limiter: ConcurrencyLimiter | None = limiter
        self._name = name

    def release(self) -> None:
        """Idempotent: the first call frees the slot."""
        if self._limiter is not None:
            self._limiter._release(self._name)
            self._limiter = None
