"""One model worker's life: load the engine, serve, report load, drain, stop.

States: loading -> ready -> draining -> stopped, or -> failed when the model cannot load or
the engine dies (a tensor-parallel rank failed): a failed worker leaves the registry and its
process exits with an error, for a supervisor to start a new one. Only a ready worker takes
generation requests; /ready answers 200 only then.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from pagedserve.protocol.fastchat import ErrorCode, WorkerStatus
from pagedserve.worker.config import WorkerConfig
from pagedserve.worker.controller_link import ControllerLink
from pagedserve.worker.fastchat_serving import FastChatServing
from pagedserve.worker.metrics import WorkerMetrics
from pagedserve.worker.openai_serving import OpenAIServing
from pagedserve.worker.requests import EngineRequests, RequestError

logger = logging.getLogger(__name__)

EngineFactory = Callable[[], Any]

ENGINE_CHECK_INTERVAL = 1.0  # seconds between checks that the engine still serves


def default_engine_factory(config: WorkerConfig) -> EngineFactory:
    def build() -> Any:
        from pagedserve.engine.async_engine import AsyncEngine

        return AsyncEngine(config.engine)

    return build


class ModelWorker:
    def __init__(
        self, config: WorkerConfig, client: httpx.AsyncClient, engine_factory: EngineFactory
    ) -> None:
        self.config = config
        self.worker_id = config.worker_id or uuid.uuid4().hex[:12]
        self.client = client
        self.engine_factory = engine_factory
        self.state = "loading"
        self.failure: str | None = None
        self.engine: Any = None
        self.metrics = WorkerMetrics(self._stats, lambda: self.state)
        self.requests: EngineRequests | None = None
        self.fastchat: FastChatServing | None = None
        self.openai: OpenAIServing | None = None
        self.link: ControllerLink | None = None
        self.on_fatal: Callable[[], None] | None = None  # set by the server: exit the process
        self._watcher: asyncio.Task[None] | None = None

    # -- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the engine (in a thread: weights load synchronously), then register."""
        try:
            logger.info("loading %s", self.config.model_path)
            self.engine = await asyncio.to_thread(self.engine_factory)
        except Exception as e:
            logger.exception("the engine failed to load")
            await self._fail(f"the model failed to load ({type(e).__name__}: {e})")
            return
        names = self.config.model_names
        self.requests = EngineRequests(self.engine, self.metrics)
        from pagedserve.engine.chat_templates import resolve_chat_template

        processor = self.engine.input_processor
        try:  # the template of the model as served: by its name, or --chat-template
            processor.chat_template = resolve_chat_template(
                processor.tokenizer, names[0], self.config.chat_template
            )
        except ValueError as e:  # --chat-template names no built-in template and no file
            await self._fail(str(e))
            return
        self.fastchat = FastChatServing(self.engine, self.requests, names)
        self.openai = OpenAIServing(self.engine, self.requests, names)
        if self.state == "loading":  # not told to stop meanwhile
            self.state = "ready"
            self._watcher = asyncio.create_task(self._watch_engine())
        logger.info("worker %s ready: %s at %s", self.worker_id, names, self.config.worker_address)
        if self.config.controller_address is not None and self.state == "ready":
            self.link = ControllerLink(
                self.config.controller_address,
                self.config.worker_address,
                self.status,
                self.client,
                self.config.heartbeat_interval,
            )
            await self.link.register()
            self.link.start()

    async def _watch_engine(self) -> None:
        """A dead engine does not come back: fail the worker as soon as it is noticed, rather
        than keep answering ready and take requests that can only fail."""
        while self.state in ("ready", "draining"):
            try:
                self.engine.check_health()
            except Exception as e:
                if self.state in ("ready", "draining"):  # not stopped meanwhile
                    await self._fail(str(e))
                return
            await asyncio.sleep(ENGINE_CHECK_INTERVAL)

    async def _fail(self, reason: str) -> None:
        """Leave the registry (so nothing is routed here), answer 503 saying why, and have
        the server exit with an error."""
        logger.error("worker failed: %s", reason)
        self.state, self.failure = "failed", reason
        if self.link is not None:
            await self.link.stop()
            await self.link.unregister()
        if self.on_fatal is not None:
            self.on_fatal()

    async def drain(self, timeout: float) -> bool:
        """Take no new requests, tell the controller, let those in flight finish (at most
        `timeout` s), then leave the registry. True if every request finished in time."""
        if self.state != "ready":
            return True
        self.state = "draining"
        logger.info("draining: %d requests in flight, up to %.1fs", self.in_flight, timeout)
        if self.link is not None:
            await self.link.heartbeat()  # carries state=draining: no new requests come
        done = True
        if self.requests is not None:
            done = await self.requests.wait_idle(timeout)
        if not done and self.requests is not None:
            logger.warning("drain timeout: aborting %d requests", self.in_flight)
            await self.requests.abort_all()
            await self.requests.wait_idle(5.0)  # their streams end with finish_reason "abort"
        if self.link is not None:
            await self.link.stop()
            await self.link.unregister()
        return done

    async def stop(self) -> None:
        """Release everything (what is still running is aborted by the engine's shutdown)."""
        if self.link is not None:
            await self.link.stop()
        self.state = "stopped" if self.state != "failed" else self.state
        if self._watcher is not None:
            self._watcher.cancel()
        if self.engine is not None:
            await self.engine.shutdown()

    # -- what others ask --------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self.requests.in_flight if self.requests is not None else 0

    def _stats(self) -> Any:
        return self.engine.stats() if self.engine is not None else None

    def status(self) -> WorkerStatus:
        s = self._stats()
        return WorkerStatus(
            model_names=self.config.model_names,
            speed=1,
            queue_length=self.in_flight,
            worker_id=self.worker_id,
            running=s.num_running if s else 0,
            waiting=s.num_waiting if s else 0,
            kv_usage=min(1.0, max(0.0, s.kv_cache_usage)) if s else 0.0,
            state="draining" if self.state == "draining" else "ready",
            context_length=self.engine.max_model_len if self.engine is not None else None,
        )

    def readiness(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ready": self.state == "ready",
            "state": self.state,
            "in_flight": self.in_flight,
        }
        if self.failure:
            body["error"] = self.failure
        return body

    def serving(self) -> tuple[FastChatServing, OpenAIServing]:
        """The serving objects of a ready worker; a 503 that says why otherwise."""
        if self.state != "ready":
            raise self._unavailable()
        return self.loaded()

    def loaded(self) -> tuple[FastChatServing, OpenAIServing]:
        """The serving objects once the engine is in (queries that generate nothing may still
        be answered while draining)."""
        if self.fastchat is None or self.openai is None:
            raise self._unavailable()
        return self.fastchat, self.openai

    def _unavailable(self) -> RequestError:
        reason = {
            "loading": "the model is still loading",
            "draining": "this worker is draining and takes no new requests",
            "failed": f"this worker has failed: {self.failure}",
        }.get(self.state, "this worker is shutting down")
        return RequestError(
            503,
            reason,
            error_code=ErrorCode.ENGINE_OVERLOADED,
            openai_type="service_unavailable",
            openai_code=f"worker_{self.state}",
        )
