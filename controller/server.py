"""Run the controller app under uvicorn (what `pagedserve controller` calls)."""

from __future__ import annotations

import logging

from pagedserve.controller.app import create_app
from pagedserve.controller.config import ControllerConfig
from pagedserve.controller.hot_routes import HotRoutes
from pagedserve.deploy import http_limits


def _quiet_http_client_logs() -> None:
    """httpx logs every request at INFO: every heartbeat and health check. Keep warnings."""
    logging.getLogger("httpx").setLevel(logging.WARNING)


def serve(config: ControllerConfig, log_level: str = "info") -> None:
    _quiet_http_client_logs()
    http_limits.run(
        HotRoutes(create_app(config)),
        config.header_timeout,
        host=config.host,
        port=config.port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        # An access line per heartbeat is 4,000 lines a second at 20,000 workers, and a sixth
        # of the controller's time: registrations, removals and errors are logged instead.
        access_log=False,
        proxy_headers=False,  # nothing here reads the client's address
    )
