"""The gateway's HTTP app: OpenAI's API for every model the controller knows, plus /health
and /metrics.

`create_app(config)` builds it; its parts live on `app.state`, and the resources (one shared
HTTP client, the routing view's refresh loop, the rate-limit store) are opened and closed by
the lifespan.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from pagedserve.api_gateway.auth import ApiKey, KeyRing
from pagedserve.api_gateway.circuit_breaker import CircuitBreakers
from pagedserve.api_gateway.cold_start import ColdStarts
from pagedserve.api_gateway.concurrency import ConcurrencyLimiter
from pagedserve.api_gateway.config import GatewayConfig
from pagedserve.api_gateway.errors import GatewayError
from pagedserve.api_gateway.forwarding import Forwarder
from pagedserve.api_gateway.http_pool import make_client
from pagedserve.api_gateway.metrics import GatewayMetrics
from pagedserve.api_gateway.rate_limit import KeyRateLimits, RedisRateLimiter, make_rate_limiter
from pagedserve.api_gateway.request_context import GatewayMiddleware, RequestContext
from pagedserve.api_gateway.retry_budget import RetryBudget
from pagedserve.api_gateway.routing import InFlight, RoutingTable
from pagedserve.api_gateway.serving import GatewayServing
from pagedserve.controller.dispatch import make_policy
from pagedserve.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)

logger = logging.getLogger(__name__)

_ERRORS = {
    400: "Invalid request (bad JSON, wrong types or values, over a limit)",
    401: "Missing or wrong API key",
    404: "Unknown model, or one the key may not use",
    413: "Request body too large",
    429: "Rate or concurrency limit of the key reached (see Retry-After)",
    502: "The model's workers failed",
    503: "Overloaded, or no worker of the model available (see Retry-After)",
    504: "The model did not answer in time",
}


# OpenAPI 3.1: the schema of an event stream describes each event. `data` holds one chunk as
# JSON (or an error object), and the last event's is [DONE].
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}


def _responses(answer: type, stream: bool) -> dict[int | str, dict[str, Any]]:
    ok: dict[str, Any] = {"model": answer, "description": "The answer"}
    if stream:
        ok["description"] = "The answer, or with stream=true Server-Sent Events ending in [DONE]"
        ok["content"] = {"text/event-stream": {"schema": _SSE_EVENT}}
    return {200: ok, **{s: {"model": ErrorResponse, "description": d} for s, d in _ERRORS.items()}}


def _body(model: type) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


# The routes read app.state and request.state themselves: dependency injection costs a
# FastAPI dependency solve per request.
def _serving(request: Request) -> GatewayServing:
    return request.app.state.serving


def _ctx(request: Request) -> RequestContext:
    return request.state.ctx


def create_app(config: GatewayConfig) -> FastAPI:
    keys = KeyRing.load(config.api_keys_file) if config.api_keys_file else None
    if keys is not None and config.control_token and config.control_token in keys:
        raise ValueError("the control token must not also be an API key (it opens the workers)")
    concurrency = ConcurrencyLimiter(config.max_concurrent_requests)
    breakers = CircuitBreakers(config.breaker_threshold, config.breaker_cooldown)
    metrics = GatewayMetrics(
        lambda: {
            "pagedserve_gateway_requests_in_flight": (
                "Requests in flight (streams until their end).",
                concurrency.total,
            ),
            "pagedserve_gateway_open_circuits": (
                "Workers skipped by their circuit breaker now.",
                breakers.open_count(),
            ),
        }
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = make_client(
            config.connect_timeout,
            max_keepalive=min(config.max_concurrent_requests, 512),
            control_token=config.control_token,
        )
        limiter = make_rate_limiter(config.redis_url, config.redis_prefix + ":ratelimit")
        table = RoutingTable(
            client,
            config.controller_address,
            config.routing_refresh_interval,
            config.controller_timeout,
        )
        table.on_change = breakers.keep_only
        try:
            if isinstance(limiter, RedisRateLimiter):
                try:
                    await limiter.ping()
                except Exception as e:
                    raise RuntimeError(f"cannot reach Redis at {config.redis_url}: {e}") from e
            await table.refresh()
            if not table.controller_ok:
                logger.warning("controller %s not reachable yet", config.controller_address)
            table.start()
            in_flight = InFlight()
            forwarder = Forwarder(
                client,
                table,
                make_policy(config.routing_policy, load=in_flight.load),
                in_flight,
                breakers,
                RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_second),
                metrics,
                config.max_retries,
                config.first_token_timeout,
            )
            limits = KeyRateLimits(limiter, lambda which: metrics.rate_limited.labels(which).inc())
            app.state.table = table
            cold_starts = None
            if config.supervisor_url is not None:
                # the client presents the control token, which the supervisor may ask for
                cold_starts = ColdStarts(
                    client, table, config.supervisor_url, config.cold_start_timeout
                )
            app.state.serving = GatewayServing(
                config, client, table, forwarder, limits, concurrency, metrics, cold_starts
            )
            logger.info(
                "gateway ready: controller=%s routing=%s keys=%s limits=%s",
                config.controller_address,
                config.routing_policy,
                len(keys) if keys else "off",
                "redis" if config.redis_url else "memory",
            )
            logger.info("control token: %s", "on" if config.control_token else "off")
            yield
        finally:
            await table.stop()
            await limiter.close()
            await client.aclose()

    app = FastAPI(title="pagedserve gateway", version="1", lifespan=lifespan)
    app.state.config = config
    app.state.metrics = metrics
    public = {"/health"} | ({"/metrics"} if config.public_metrics else set())
    app.add_middleware(GatewayMiddleware, keys=keys, public_paths=public, metrics=metrics)

    @app.exception_handler(GatewayError)
    async def _refused(request: Request, exc: GatewayError) -> Response:
        request.state.ctx.error = exc.code or exc.type
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        message = "Unknown route." if exc.status_code == 404 else str(exc.detail)
        return GatewayError(exc.status_code, message, code="unknown_route").response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return GatewayError(400, f"Invalid request: {exc.errors()}").response()

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        table: RoutingTable = request.app.state.table
        return {
            "status": "ok",
            "controller": "ok" if table.controller_ok else "unreachable",
            "models": len(table.model_names()),
            "pid": os.getpid(),  # which of several gateway processes (--workers) answered
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=_responses(ModelList, False))
    async def list_models(request: Request) -> ModelList:
        return ModelList(data=_visible(request.app.state.table.models(), _ctx(request).key))

    @app.get(
        "/v1/models/{model:path}", response_model=ModelCard, responses=_responses(ModelCard, False)
    )
    async def retrieve_model(model: str, request: Request) -> ModelCard:
        for card in _visible(request.app.state.table.models(), _ctx(request).key):
            if card.id == model:
                return card
        raise GatewayError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=_responses(ChatCompletionResponse, True),
        openapi_extra=_body(ChatCompletionRequest),
    )
    async def chat_completions(request: Request) -> Response:
        return await _serving(request).chat(request)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=_responses(CompletionResponse, True),
        openapi_extra=_body(CompletionRequest),
    )
    async def completions(request: Request) -> Response:
        return await _serving(request).completions(request)

    _install_openapi(app, [ChatCompletionRequest, CompletionRequest], secured=keys is not None)
    return app


def _visible(cards: list[ModelCard], key: ApiKey | None) -> list[ModelCard]:
    return [c for c in cards if key is None or key.allows(c.id)]


def _install_openapi(app: FastAPI, request_models: list[type], secured: bool) -> None:
    """FastAPI's schema, plus the request bodies (read by the serving code itself, so that body
    size, bad JSON and types answer in OpenAI's words) and, with keys, bearer auth."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema(
                [(m, "validation") for m in request_models],
                ref_template="#/components/schemas/{model}",
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in defs.get("$defs", {}).items():
                if components.setdefault(name, definition) != definition:
                    raise RuntimeError(f"two different OpenAPI schemas are named {name}")
            if secured:
                schema["components"]["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}
                }
                schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
