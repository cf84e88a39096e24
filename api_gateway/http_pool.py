"""The gateway's one HTTP client, with its connections spread over several small pools.

httpcore 1.0's pool (under httpx 0.28) scans every connection each time a request is added or
finished, and for each idle one counts the idle ones again: work quadratic in the number of
connections, plus a socket poll per idle connection. With 64 streams in flight that cost
several milliseconds of CPU per request. Requests here go to `shards` pools in turn, each
holding a share of the connections, which keeps every scan short; the client is still one
`httpx.AsyncClient` with one set of timeouts.
"""

from __future__ import annotations

import itertools
import math
import ssl

import httpx


class ShardedTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int, max_keepalive: int, shards: int = 16) -> None:
        # Each pool may take twice its share, so that an uneven moment never waits on one pool.
        per_pool = max(1, math.ceil(2 * max_connections / shards))
        keepalive = max(1, math.ceil(max_keepalive / shards))
        tls = ssl.create_default_context()  # loading the CA store once, not once a pool
        self._pools = [
            httpx.AsyncHTTPTransport(
                verify=tls,
                limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=keepalive),
            )
            for _ in range(shards)
        ]
        self._turn = itertools.cycle(self._pools)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await next(self._turn).handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


def make_client(
    connect_timeout: float, max_connections: int, max_keepalive: int
) -> httpx.AsyncClient:
    """No read timeout: the gateway bounds first bytes and whole requests itself."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=connect_timeout, pool=connect_timeout),
        transport=ShardedTransport(max_connections, max_keepalive),
    )
