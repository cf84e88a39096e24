"""One attempt at one worker: send the request to its OpenAI route and sort the outcome.

- `Answer`: a whole (non-streamed) 200 answer.
- `OpenStream`: a 200 stream whose first bytes have arrived (so fail-over is over).
- `Refusal`: a 4xx; the client's fault, passed on as is, never retried.
- `UpstreamFailure` (raised): no connection, a timeout before the first byte, a 5xx, a broken
  answer; the worker's fault, so another worker may be tried.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx

from pagedserve.api_gateway.http_pool import UpstreamClient

# An error body larger than this is cut (it is only ever an error message).
_MAX_ERROR_BODY = 64 << 10


class UpstreamFailure(Exception):
    def __init__(
        self, reason: str, message: str, status: int | None = None, body: bytes | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason  # connect, timeout, status, broken
        self.message = message
        self.status = status
        self.body = body


@dataclass
class Answer:
    body: bytes


@dataclass
class Refusal:
    status: int
    body: bytes
    content_type: str


@dataclass
class OpenStream:
    response: httpx.Response
    chunks: AsyncIterator[bytes]
    first: bytes

    async def aclose(self) -> None:
        """Closing before the end drops the connection: the worker aborts the request."""
        await self.response.aclose()


@functools.lru_cache(maxsize=4096)
def _url(url: str) -> httpx.URL:
    """Parsed once per worker and route: parsing is a good part of what a request costs httpx."""
    return httpx.URL(url)


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def _error_body(response: httpx.Response) -> bytes:
    body = b""
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > _MAX_ERROR_BODY:
            break
    return body[:_MAX_ERROR_BODY]


async def send_once(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    stream: bool,
    first_byte_deadline: float,
    deadline: float,
) -> Answer | OpenStream | Refusal:
    """Raises UpstreamFailure for anything another worker might do better."""
    response: httpx.Response | None = None
    try:
        with anyio.fail_after(_remaining(first_byte_deadline if stream else deadline)):
            if isinstance(client, UpstreamClient):  # the gateway's own: straight to the worker
                response = await client.send_direct(_url(url), body, headers)
            else:
                request = client.build_request("POST", _url(url), content=body, headers=headers)
                response = await client.send(request, stream=True)
            if response.status_code >= 400:
                error = await _error_body(response)
                await response.aclose()
                if response.status_code < 500:
                    kind = response.headers.get("content-type", "application/json")
                    return Refusal(response.status_code, error, kind)
                raise UpstreamFailure(
                    "status",
                    f"the worker answered HTTP {response.status_code}: "
                    f"{error[:500].decode(errors='replace')}",
                    status=response.status_code,
                    body=error,
                )
            if not stream:
                return Answer(await response.aread())
            chunks = response.aiter_raw()
            first = b""
            while not first:  # an empty read is not a byte
                first = await chunks.__anext__()
            return OpenStream(response, chunks, first)
    except TimeoutError as e:
        await _close(response)
        what = "its first byte" if stream else "its answer"
        raise UpstreamFailure("timeout", f"the worker did not send {what} in time") from e
    except httpx.ConnectError as e:
        raise UpstreamFailure("connect", f"cannot connect to the worker: {e}") from e
    except httpx.TimeoutException as e:  # connect or pool timeout
        await _close(response)
        raise UpstreamFailure("connect", f"the worker did not accept a connection: {e!r}") from e
    except (httpx.HTTPError, StopAsyncIteration) as e:
        await _close(response)
        raise UpstreamFailure("broken", f"the worker's answer broke off: {e!r}") from e
    except BaseException:
        await _close(response)
        raise


async def _close(response: httpx.Response | None) -> None:
    if response is not None:
        with anyio.CancelScope(shield=True):
            await response.aclose()
