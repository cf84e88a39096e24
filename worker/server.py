"""Run a worker under uvicorn (what `pagedserve worker` calls), draining on SIGTERM.

SIGTERM: the worker stops taking requests, tells the controller it is draining, lets the
requests in flight finish (at most --drain-timeout seconds), leaves the registry, and exits.
A second SIGTERM, or SIGINT, exits at once the way uvicorn always does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn

from pagedserve.deploy.http_limits import LimitedConfig
from pagedserve.worker.app import create_app
from pagedserve.worker.config import WorkerConfig

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, worker_config: WorkerConfig) -> None:
        super().__init__(config)
        self.app = config.app
        self.worker_config = worker_config
        self.exit_code = 0
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._draining and self._loop is not None:
            self._draining = True
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        worker = getattr(self.app.state, "worker", None)
        try:
            if worker is not None:
                await worker.drain(self.worker_config.drain_timeout)
        except Exception:
            logger.exception("drain failed")
        finally:
            self.should_exit = True

    def fatal(self) -> None:
        """The engine could not load: exit with an error instead of idling unready."""
        self.exit_code = 1
        self.should_exit = True


def _quiet_http_client_logs() -> None:
    """httpx logs every request at INFO: every heartbeat and health check. Keep warnings."""
    logging.getLogger("httpx").setLevel(logging.WARNING)


def serve(config: WorkerConfig, log_level: str = "info") -> None:
    _quiet_http_client_logs()
    app = create_app(config)
    server = DrainingServer(
        LimitedConfig(
            app,
            config.header_timeout,
            host=config.host,
            port=config.port,
            log_level=log_level,
            timeout_graceful_shutdown=5,
        ),
        config,
    )
    app.state.on_fatal = server.fatal
    server.run()
    if server.exit_code:
        sys.exit(server.exit_code)
