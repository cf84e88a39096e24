"""Run the controller app under uvicorn (what `pagedserve controller` calls)."""

from __future__ import annotations

import logging

import uvicorn

from pagedserve.controller.app import create_app
from pagedserve.controller.config import ControllerConfig
from pagedserve.controller.hot_routes import HotRoutes


def _quiet_http_client_logs() -> None:
    """httpx logs every request at INFO: every heartbeat and health check. Keep warnings."""
    logging.getLogger("httpx").setLevel(logging.WARNING)


def serve(config: ControllerConfig, log_level: str = "info") -> None:
    _quiet_http_client_logs()
    uvicorn.run(
        HotRoutes(create_app(config)),
        host=config.host,
        port=config.port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )
