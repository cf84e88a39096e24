"""Engine requests as the HTTP layer holds them: started eagerly (bad input fails before any
byte is sent), counted while in flight (heartbeats, draining), timed (metrics), and always
aborted in `finally` when they end early (client gone, error, shutdown), which frees their KV
blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from pagedserve.protocol.fastchat import ErrorCode
from pagedserve.worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")

# How long an abort may take before we stop waiting for the engine to confirm it.
ABORT_WAIT_S = 5.0


class RequestError(Exception):
    """A request refused before anything was sent; the app formats it for the route family
    (OpenAI's error object on /v1, FastChat's {"text", "error_code"} elsewhere)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        error_code: ErrorCode = ErrorCode.PARAM_OUT_OF_RANGE,
        openai_type: str = "invalid_request_error",
        openai_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.error_code = error_code
        self.openai_type = openai_type
        self.openai_code = openai_code


def refused(e: ValueError, prompt_param: str = "prompt") -> RequestError:
    """The 400 of a request the engine refuses (engine/input_processor.py's
    InvalidRequestError, or a SamplingParams ValueError): its `param`, else `prompt_param`,
    the field that held the prompt; an over-long prompt keeps OpenAI's and FastChat's codes."""
    overflow = getattr(e, "code", None) == "context_length_exceeded"
    return RequestError(
        400,
        str(e),
        param=getattr(e, "param", None) or prompt_param,
        error_code=ErrorCode.CONTEXT_OVERFLOW if overflow else ErrorCode.PARAM_OUT_OF_RANGE,
        openai_code=getattr(e, "code", None),
    )


class EngineRequests:
    def __init__(self, engine: Any, metrics: WorkerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._active: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._active)

    async def start(
        self,
        prompt: Any,
        params: Any,
        request_id: str,
        route: str,
        resume: Any = None,
        prompt_param: str = "prompt",
    ) -> RequestStream:
        """Add a request (`resume`: see engine/resume.py) and wait for its first output; the
        engine's ValueError for bad input (empty or too long prompt, ...) becomes a 400 with
        nothing left behind, naming `prompt_param` when the prompt is at fault."""
        gen = self._run(prompt, params, request_id, route, time.monotonic(), resume)
        try:
            first = await gen.__anext__()
        except ValueError as e:
            await gen.aclose()
            raise refused(e, prompt_param) from e
        except RuntimeError as e:  # the engine is shut down or its loop failed
            await gen.aclose()
            raise RequestError(
                503,
                f"the engine cannot take requests: {e}",
                error_code=ErrorCode.INTERNAL_ERROR,
                openai_type="service_unavailable",
            ) from e
        except BaseException:
            await gen.aclose()
            raise
        return RequestStream(first, gen)

    async def start_all(
        self, jobs: Sequence[tuple[Any, Any, str]], route: str, prompt_param: str = "prompt"
    ) -> list[RequestStream]:
        """Start several requests (n > 1, several prompts); if one is refused none is kept."""
        results = await asyncio.gather(
            *(
                self.start(prompt, params, rid, route, prompt_param=prompt_param)
                for prompt, params, rid in jobs
            ),
            return_exceptions=True,
        )
        streams = [r for r in results if isinstance(r, RequestStream)]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            for s in streams:
                await s.aclose()
            raise failure
        return streams

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def abort_all(self) -> None:
        """End every request in flight now; each stream ends with finish_reason "abort"."""
        await asyncio.gather(*(self._abort(rid) for rid in list(self._active)))

    async def _run(
        self, prompt: Any, params: Any, request_id: str, route: str, arrival: float, resume: Any
    ) -> AsyncIterator[Any]:
        self._active.add(request_id)
        self._idle.clear()
        finished = False
        first_token = False
        outcome: str | None = "aborted"
        try:
            async for out in self.engine.generate(prompt, params, request_id, resume):
                if not first_token and out.outputs and out.outputs[0].token_ids:
                    first_token = True
                    self.metrics.ttft.observe(time.monotonic() - arrival)
                finished = out.finished
                yield out
            outcome = "ok"
            self.metrics.latency.observe(time.monotonic() - arrival)
        except ValueError:
            outcome = None  # refused: counted where the 400 is sent
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            try:
                if not finished:
                    # Shielded: a cancelled stream (client gone) must still free its blocks.
                    with anyio.CancelScope(shield=True):
                        await self._abort(request_id)
            finally:
                if outcome is not None:
                    self.metrics.requests.labels(route, outcome).inc()
                self._active.discard(request_id)
                if not self._active:
                    self._idle.set()

    async def _abort(self, request_id: str) -> None:
        try:
            await asyncio.wait_for(self.engine.abort(request_id), ABORT_WAIT_S)
        except asyncio.TimeoutError:
            logger.warning("abort of %s not confirmed within %ss", request_id, ABORT_WAIT_S)
        except Exception:
            logger.exception("abort of %s failed", request_id)


class RequestStream:
    """One started engine request: its first output, then the rest. Close it when done."""

    def __init__(self, first: Any, rest: AsyncIterator[Any]) -> None:
        self.first = first
        self._rest = rest

    async def __aiter__(self) -> AsyncIterator[Any]:
        yield self.first
        if self.first.finished:
            return
        async for out in self._rest:
            yield out

    async def aclose(self) -> None:
        await self._rest.aclose()


async def merged(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several streams as outputs arrive, as (index, output); closing the merged
    stream closes (and so aborts) every stream still running."""
    if len(streams) == 1:  # the common case needs no tasks
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return

    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out, None, False))
        except Exception as e:
            await queue.put((i, None, e, True))
            return
        finally:
            await stream.aclose()
        await queue.put((i, None, None, True))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, out, error, done = await queue.get()
            if error is not None:
                raise error
            if done:
                remaining -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(request: Request, work: Awaitable[T], poll_s: float = 0.25) -> T:
    """Run `work` (a non-streaming generation), cancelling it if the client goes away; its
    streams' `finally` then aborts the engine requests."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise RequestError(
                    499, "the client closed the connection", openai_type="client_closed"
                )
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
