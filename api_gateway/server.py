"""Run the gateway app under uvicorn (what `pagedserve gateway` calls): uvloop and httptools,
and with `workers` > 1 that many gateway processes accepting on one port.

The processes share nothing but what lives outside them: per-key RPM and TPM limits are only
one limit across processes when they are kept in Redis, so several processes with such limits
need `redis_url`; a key's `max_concurrent` is counted in each process, so it cannot be used
with several. Each process has its own routing view, circuit breakers, concurrency limit
(`max_concurrent_requests` is per process) and /metrics.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os

from fastapi import FastAPI

from pagedserve.api_gateway.app import create_app
from pagedserve.api_gateway.auth import KeyRing
from pagedserve.api_gateway.config import GatewayConfig
from pagedserve.deploy import http_limits

# How `serve` hands the configuration to its worker processes (uvicorn starts them fresh).
_CONFIG_ENV = "PAGEDSERVE_GATEWAY_CONFIG"


def check_workers(config: GatewayConfig, workers: int) -> None:
    """ValueError unless `workers` processes can keep the configured limits."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    if workers == 1 or config.api_keys_file is None:
        return
    keys = KeyRing.load(config.api_keys_file)
    if config.redis_url is None and keys.has_rate_limits():
        raise ValueError(
            f"{workers} gateway processes would each apply the keys' rpm/tpm limits on their "
            "own; give --redis-url so that they share them, or run one process"
        )
    if keys.has_concurrency_limits():
        raise ValueError(
            "a key's max_concurrent is counted per process, so it cannot be kept by "
            f"{workers} gateway processes; remove it from the key file or run one process"
        )


def _app_from_environment() -> FastAPI:
    """uvicorn's factory in each worker process."""
    _quiet_httpx()
    return create_app(GatewayConfig(**json.loads(os.environ[_CONFIG_ENV])))


def _quiet_httpx() -> None:
    # httpx logs every request at INFO; the gateway writes its own access log instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def serve(config: GatewayConfig, log_level: str = "info", workers: int = 1) -> None:
    check_workers(config, workers)
    _quiet_httpx()
    options = {
        "host": config.host,
        "port": config.port,
        "log_level": log_level,
        "access_log": False,
        "timeout_graceful_shutdown": 5,
        # uvicorn[standard] installs both; "auto" would fall back silently where it did not
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
    }
    if workers == 1:
        http_limits.run(create_app(config), config.header_timeout, **options)
        return
    os.environ[_CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
    http_limits.run(
        "pagedserve.api_gateway.server:_app_from_environment",
        config.header_timeout,
        factory=True,
        workers=workers,
        **options,
    )
