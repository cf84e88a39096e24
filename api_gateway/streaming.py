"""Relaying a worker's Server-Sent Events to the client, after the first byte.

Events pass through byte for byte, whole events at a time (bytes after the last blank line
wait for the rest of their event), so that a failure never leaves half an event: a broken
connection or the total timeout ends the stream with one OpenAI error event and
`data: [DONE]`, unless a `StreamResumer` (resumption.py) can go on on another worker: then the
half event is dropped and the other worker's stream follows. The relay also notes what the log
and the limits need: the events sent and the usage of the final chunk when the client asked
for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import httpx
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedserve.api_gateway.errors import error_event
from pagedserve.api_gateway.upstream import OpenStream

if TYPE_CHECKING:
    from pagedserve.api_gateway.resumption import StreamResumer

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


if sys.version_info >= (3, 11):

    async def within(deadline: float, step: Awaitable[T]) -> T:
        """`await step`, or TimeoutError at `deadline` (a time.monotonic() time)."""
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await step

else:  # pragma: no cover - Python 3.10

    async def within(deadline: float, step: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(step, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError as e:
            raise TimeoutError from e


class SSERelay:
    def __init__(
        self,
        stream: OpenStream,
        deadline: float,
        resumer: StreamResumer | None = None,
        on_first_token: Callable[[], None] | None = None,
    ) -> None:
        self.stream = stream  # the worker's stream now (another one after a resumption)
        self.deadline = deadline
        self.resumer = resumer
        # Called when the stream's first token went through (each worker's, after a
        # resumption): the worker's prefill is over. Where no chunk says which tokens it
        # carries, the first bytes stand for it.
        self.on_first_token = on_first_token
        self.events = 0
        self.usage: dict[str, Any] | None = None
        self.done = False  # the worker's [DONE] went through
        self.error: str | None = None  # why the stream ended early

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pending = b""
        data = self.stream.first
        prefilled = self.on_first_token is None
        while True:
            pending += data
            cut = pending.rfind(b"\n\n") + 2
            if cut >= 2:
                block, pending = pending[:cut], pending[cut:]
                if self.resumer is not None:
                    block = self.resumer.observe(block)
                self._observe(block)
                if not prefilled and (self.resumer is None or self.resumer.token_ids):
                    prefilled = True
                    self.on_first_token()  # type: ignore[misc]
                yield block
            broke = None
            try:
                data = await within(self.deadline, self.stream.chunks.__anext__())
                continue
            except StopAsyncIteration:
                if not self.done:
                    broke = "the worker ended the stream without [DONE]"
            except TimeoutError:
                self.error = "timeout"
            except httpx.HTTPError as e:
                broke = f"worker stream broke: {e!r}"
            if broke is not None and self.resumer is not None:
                end = self.resumer.answer_end()
                if end is not None:
                    # the worker went after the answer's last token and before [DONE]: the
                    # answer is whole (only a usage chunk, if asked for, is missing)
                    self.done = True
                    yield end + DONE
                    break
                stream = await self.resumer.resume(broke)
                if stream is not None:
                    await self.stream.aclose()
                    self.stream, pending, data = stream, b"", stream.first
                    prefilled = self.on_first_token is None
                    continue
            self.error = self.error or broke
            break
        if not self.done:
            if self.error is None:
                self.error = "the worker ended the stream without [DONE]"
            code = "timeout" if self.error == "timeout" else "upstream_error"
            message = (
                "the request took longer than the gateway's total timeout"
                if code == "timeout"
                else f"generation failed after the stream started: {self.error}"
            )
            yield error_event(message, code) + DONE

    def _observe(self, block: bytes) -> None:
        self.events += block.count(b"data: ")
        if block.endswith(DONE):
            self.done = True
        if b'"usage":{' in block:
            for event in block.split(b"\n\n"):
                if b'"usage":{' in event and event.startswith(b"data: "):
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        self.usage = json.loads(event[6:])["usage"]


class RelayResponse(StreamingResponse):
    """A streaming response that always runs `on_close` when it ends, however it ends (client
    gone, error, timeout): the upstream connection is closed there, so the worker aborts."""

    def __init__(
        self,
        relay: SSERelay,
        on_close: Callable[[], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ) -> None:
        self._iterator = relay.__aiter__()
        super().__init__(self._iterator, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._iterator.aclose()  # type: ignore[attr-defined]
                finally:
                    await self._on_close()
