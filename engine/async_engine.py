"""The engine for servers: an asyncio front over LLMEngine.

Steps run in a worker thread so the event loop stays free for HTTP; requests are added and
aborted only between steps, by the loop task itself, so the engine is never touched by two
threads at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.input_processor import InputProcessor
from pagedserve.engine.llm_engine import EngineDeadError, LLMEngine, PromptType
from pagedserve.engine.outputs import EngineStats, RequestOutput
from pagedserve.engine.resume import Resume
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)


__all__ = ["AsyncEngine", "EngineDeadError"]


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self.engine = LLMEngine(config)
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._to_add: list[Sequence] = []
        self._to_abort: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._stopped = False

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def input_processor(self) -> InputProcessor:
        return self.engine.input_processor

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def is_running(self) -> bool:
        """False once shut down or once the engine has died (a tensor-parallel rank failed)."""
        return not self._stopped and self.engine.is_healthy

    def check_health(self) -> None:
        """Raise EngineDeadError, saying why, unless the engine can serve."""
        if self._stopped:
            raise EngineDeadError("the engine has been shut down")
        self.engine.check_health()

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        resume: Resume | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request, as `params.output_kind` asks: the whole answer
        so far (the default), only what is new (DELTA), or the end only (with `resume`, of an
        answer another engine began: engine/resume.py); bad input raises before the first."""
        self.check_health()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.engine.input_processor.process(request_id, prompt, params, resume)
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        self._to_add.append(request)
        self._kick()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (disconnect, error): free its blocks
                self._to_abort.append(request_id)
                self._kick()

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once its blocks are back in the pool."""
        self._to_abort.append(request_id)
        self._kick()
        while request_id in self._to_abort:
            await asyncio.sleep(0.001)

    async def shutdown(self) -> None:
        self._stopped = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for stream in self._streams.values():
            stream.put_nowait(EngineDeadError("the engine has been shut down"))
        await asyncio.to_thread(self.engine.shutdown)  # stops tensor-parallel ranks, if any

    def _kick(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.create_task(self._run())
        self._wakeup.set()

    def _apply_pending(self) -> None:
        adds, self._to_add = self._to_add, []
        for request in adds:
            if request.request_id in self._streams:  # not abandoned before it started
                try:
                    self.engine.add(request)
                except (EngineDeadError, ValueError) as e:  # ValueError: cannot be resumed
                    self._streams[request.request_id].put_nowait(e)
        aborts, self._to_abort = self._to_abort, []
        for request_id in aborts:
            out = self.engine.abort_request(request_id)
            stream = self._streams.get(request_id)
            if out is not None and stream is not None:
                stream.put_nowait(out)

    async def _run(self) -> None:
        while not self._stopped:
            self._apply_pending()
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                if not (self._to_add or self._to_abort):
                    await self._wakeup.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except EngineDeadError as e:  # a rank failed: every request in flight ends with it
                logger.error("%s", e)
                self._stopped = True
                for stream in self._streams.values():
                    stream.put_nowait(e)
                return
            except Exception as e:  # keep serving: fail the requests in flight, not the engine
                logger.exception("engine step failed; failing the requests in flight")
                for request_id in list(self.engine.requests):
                    self.engine.abort_request(request_id)
                    stream = self._streams.get(request_id)
                    if stream is not None:
                        stream.put_nowait(RuntimeError(f"engine step failed: {e}"))
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put_nowait(out)
