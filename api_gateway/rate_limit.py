"""Per-key rate limits: token buckets, in memory or in Redis (shared by gateway replicas).

A limit of N per minute is a bucket of N that refills at N/60 per second. Requests take 1 from
the key's RPM bucket; tokens are charged to its TPM bucket in two steps: the prompt's estimate
on admission (refused if the bucket cannot cover it), then the difference to the tokens
actually used once the answer is complete, which may leave the bucket in debt: the next request
waits until it is paid off. A refusal says how long to wait (Retry-After).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pagedserve.api_gateway.auth import ApiKey
from pagedserve.api_gateway.errors import GatewayError

logger = logging.getLogger(__name__)


class RateLimiter(Protocol):
    async def take(self, bucket: str, per_minute: int, cost: float) -> float:
        """Take `cost` if the bucket holds it (a cost above the bucket's size needs a full
        bucket) and return 0.0; otherwise take nothing and return the seconds to wait."""
        ...

    async def charge(self, bucket: str, per_minute: int, cost: float) -> None:
        """Take `cost` whatever the level (a negative cost gives back)."""
        ...

    async def close(self) -> None: ...


def _refill(level: float, updated: float, now: float, capacity: float) -> float:
    return min(capacity, level + max(0.0, now - updated) * capacity / 60.0)


class InMemoryRateLimiter:
    """Buckets of one process; `clock` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (level, updated)

    def _level(self, bucket: str, capacity: float, now: float) -> float:
        level, updated = self._buckets.get(bucket, (capacity, now))
        return _refill(level, updated, now, capacity)

    async def take(self, bucket: str, per_minute: int, cost: float) -> float:
        now = self.clock()
        level = self._level(bucket, per_minute, now)
        need = min(cost, per_minute)
        if level < need:
            self._buckets[bucket] = (level, now)
            return (need - level) * 60.0 / per_minute
        self._buckets[bucket] = (level - cost, now)
        return 0.0

    async def charge(self, bucket: str, per_minute: int, cost: float) -> None:
        now = self.clock()
        self._buckets[bucket] = (self._level(bucket, per_minute, now) - cost, now)

    async def close(self) -> None:
        pass


# KEYS[1]: the bucket; ARGV: capacity, cost, "take" or "charge". Redis's own clock, so that
# every gateway agrees; the key expires once the bucket would be full again (plus a minute).
_BUCKET_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local rate = capacity / 60.0
local saved = redis.call('HMGET', KEYS[1], 'level', 'updated')
local level = tonumber(saved[1]) or capacity
local updated = tonumber(saved[2]) or now
level = math.min(capacity, level + math.max(0, now - updated) * rate)
local wait = 0
local need = math.min(cost, capacity)
if ARGV[3] == 'take' and level < need then
  wait = (need - level) / rate
else
  level = level - cost
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(((capacity - level) / rate + 60) * 1000))
return tostring(wait)
"""


class RedisRateLimiter:
    """Buckets in Redis, updated atomically by one Lua script; several gateways share them."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as redis

        self._redis = redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._prefix = prefix
        self._script = self._redis.register_script(_BUCKET_SCRIPT)

    async def ping(self) -> None:
        await self._redis.ping()

    async def _run(self, bucket: str, per_minute: int, cost: float, mode: str) -> float:
        key = f"{self._prefix}:bucket:{bucket}"
        wait = await self._script(keys=[key], args=[per_minute, cost, mode])
        return float(wait)

    async def take(self, bucket: str, per_minute: int, cost: float) -> float:
        return await self._run(bucket, per_minute, cost, "take")

    async def charge(self, bucket: str, per_minute: int, cost: float) -> None:
        await self._run(bucket, per_minute, cost, "charge")

    async def close(self) -> None:
        await self._redis.aclose()


@dataclass
class Admission:
    """What a request was charged on admission, settled when it ends."""

    key: ApiKey | None
    tokens_charged: int = 0


class KeyRateLimits:
    """RPM and TPM of API keys over a RateLimiter. If the limiter's store fails, requests are
    let through (and the failure logged): an outage of Redis must not stop the API."""

    def __init__(self, limiter: RateLimiter, on_refusal: Callable[[str], None]) -> None:
        self.limiter = limiter
        self.on_refusal = on_refusal

    async def admit(self, key: ApiKey | None, prompt_tokens: int) -> Admission:
        if key is None or (key.rpm is None and key.tpm is None):
            return Admission(key)
        admission = Admission(key)
        if key.tpm is not None:
            wait = await self._take(f"{key.name}:tpm", key.tpm, prompt_tokens)
            if wait:
                self.on_refusal("tpm")
                raise GatewayError(
                    429,
                    f"Rate limit reached for tokens per minute (limit {key.tpm}) of key "
                    f"{key.name!r}. Please try again in {wait:.1f}s.",
                    type="tokens",
                    code="rate_limit_exceeded",
                    retry_after=wait,
                )
            admission.tokens_charged = prompt_tokens
        if key.rpm is not None:
            wait = await self._take(f"{key.name}:rpm", key.rpm, 1)
            if wait:
                await self.settle(admission, 0)  # give the tokens back
                self.on_refusal("rpm")
                raise GatewayError(
                    429,
                    f"Rate limit reached for requests per minute (limit {key.rpm}) of key "
                    f"{key.name!r}. Please try again in {wait:.1f}s.",
                    type="requests",
                    code="rate_limit_exceeded",
                    retry_after=wait,
                )
        return admission

    async def settle(self, admission: Admission, tokens_used: int) -> None:
        """Charge the difference between the tokens used and those charged on admission."""
        key = admission.key
        if key is None or key.tpm is None or tokens_used == admission.tokens_charged:
            return
        try:
            await self.limiter.charge(
                f"{key.name}:tpm", key.tpm, tokens_used - admission.tokens_charged
            )
            admission.tokens_charged = tokens_used
        except Exception as e:
            logger.warning("rate-limit store failed; token use of %s not recorded: %s", key.name, e)

    async def _take(self, bucket: str, per_minute: int, cost: float) -> float:
        try:
            return await self.limiter.take(bucket, per_minute, cost)
        except Exception as e:
            logger.warning("rate-limit store failed; letting the request through: %s", e)
            return 0.0


def make_rate_limiter(redis_url: str | None, prefix: str) -> RateLimiter:
    if redis_url is None:
        return InMemoryRateLimiter()
    return RedisRateLimiter(redis_url, prefix)
