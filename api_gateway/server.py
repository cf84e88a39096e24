"""Run the gateway app under uvicorn (what `pagedserve gateway` calls)."""

from __future__ import annotations

import logging

import uvicorn

from pagedserve.api_gateway.app import create_app
from pagedserve.api_gateway.config import GatewayConfig


def serve(config: GatewayConfig, log_level: str = "info") -> None:
    # httpx logs every request at INFO; the gateway writes its own access log instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
