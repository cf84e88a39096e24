"""Run the controller app under uvicorn (what `pagedserve controller` calls)."""

from __future__ import annotations

import logging

from pagedserve.controller.app import create_app
from pagedserve.controller.config import ControllerConfig
from pagedserve.deploy import http_limits


def _quiet_http_client_logs() -> None:
    """httpx logs every request at INFO: every heartbeat and health check. Keep warnings."""
    logging.getLogger("httpx").setLevel(logging.WARNING)


def serve(config: ControllerConfig, log_level: str = "info") -> None:
    _quiet_http_client_logs()
    http_limits.run(
        create_app(config),
        config.header_timeout,
        host=config.host,
        port=config.port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )
