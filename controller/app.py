"""The controller's HTTP app: FastChat's controller routes plus pagedserve's own.

`create_app(config)` builds it; its state (store, policy, HTTP client, monitor) lives on
`app.state` and is opened and closed by the lifespan.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from pagedserve.controller.config import ControllerConfig
from pagedserve.controller.dispatch import ROUTE_HEADER, RouteRequest, make_policy
from pagedserve.controller.metrics import ControllerMetrics
from pagedserve.controller.monitor import Monitor
from pagedserve.controller.registry import Controller, WorkerUnreachable
from pagedserve.controller.store import StoreError, make_store
from pagedserve.deploy.http_limits import BodyLimit
from pagedserve.protocol.control_token import ControlTokenGate, control_headers
from pagedserve.protocol.fastchat import ErrorCode
from pagedserve.protocol.registry import (
    DrainResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    ListModelsResponse,
    ModelRequest,
    RegisterWorkerRequest,
    RegisterWorkerResponse,
    UnregisterWorkerRequest,
    WorkerAddressResponse,
    WorkersResponse,
)

logger = logging.getLogger(__name__)


def error_response(status: int, code: ErrorCode, text: str, framed: bool = False) -> Response:
    """FastChat's error body; `framed` adds the NUL byte that ends a streamed message."""
    body = json.dumps({"text": text, "error_code": int(code)}).encode()
    if framed:
        return Response(body + b"\0", status_code=status, media_type="application/octet-stream")
    return Response(body, status_code=status, media_type="application/json")


# With a control token, every other path needs it: registration, heartbeats, the admin routes
# and the generate proxy (and the API docs). These stay open for FastChat's clients and probes.
OPEN_PATHS = frozenset(
    {
        "/list_models",
        "/list_multimodal_models",
        "/list_language_models",
        "/get_worker_address",
        "/test_connection",
        "/health",
        "/metrics",
    }
)


def unauthorized(scope: dict) -> Response:
    text = (
        "this controller needs the control token: Authorization: Bearer TOKEN "
        "(--control-token or $PAGEDSERVE_CONTROL_TOKEN)"
    )
    framed = scope["path"].endswith("generate_stream")
    return error_response(401, ErrorCode.INVALID_AUTH_KEY, text, framed)


def validation_text(exc: RequestValidationError | ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _controller(request: Request) -> Controller:
    return request.app.state.controller


Ctl = Annotated[Controller, Depends(_controller)]


def create_app(config: ControllerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = make_store(config.redis_url, config.redis_prefix)
        client = httpx.AsyncClient(  # presents the control token on every call to a worker
            timeout=httpx.Timeout(10.0, connect=5.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
            headers=control_headers(config.control_token),
        )
        try:
            await store.ping()
            await store.refresh_view()
            app.state.controller = Controller(
                config, store, make_policy(config.routing_policy), client, ControllerMetrics()
            )
            monitor = Monitor(app.state.controller)
            monitor.start()
            logger.info(
                "controller ready: routing=%s store=%s expiration=%ss",
                config.routing_policy,
                "redis" if config.redis_url else "memory",
                config.heartbeat_expiration,
            )
            logger.info("control token: %s", "on" if config.control_token else "off")
            try:
                yield
            finally:
                await monitor.stop()
        finally:
            await client.aclose()
            await store.close()

    # FastChat's servers read JSON whatever the content type says (curl -d sends a form type).
    app = FastAPI(title="pagedserve controller", lifespan=lifespan, strict_content_type=False)
    app.state.config = config
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.control_token:  # outermost: a refused request's body is never read
        app.add_middleware(
            ControlTokenGate,
            token=config.control_token,
            open_paths=OPEN_PATHS,
            refuse=unauthorized,
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> Response:
        return error_response(400, ErrorCode.VALIDATION_TYPE_ERROR, validation_text(exc))

    @app.exception_handler(StoreError)
    async def _store_down(request: Request, exc: StoreError) -> Response:
        return error_response(503, ErrorCode.INTERNAL_ERROR, str(exc))

    @app.exception_handler(WorkerUnreachable)
    async def _worker_down(request: Request, exc: WorkerUnreachable) -> Response:
        framed = request.url.path.endswith("generate_stream")
        return error_response(503, ErrorCode.CONTROLLER_WORKER_TIMEOUT, str(exc), framed)

    # -- FastChat's controller protocol ------------------------------------------------------

    @app.post("/register_worker", response_model=RegisterWorkerResponse)
    async def register_worker(body: RegisterWorkerRequest, ctl: Ctl) -> RegisterWorkerResponse:
        info = await ctl.register(body)
        return RegisterWorkerResponse(registered=True, worker_id=info.worker_id)

    @app.post("/receive_heart_beat", response_model=HeartbeatResponse)
    async def receive_heart_beat(body: HeartbeatRequest, ctl: Ctl) -> HeartbeatResponse:
        return HeartbeatResponse(exist=await ctl.heartbeat(body))

    @app.post("/unregister_worker")
    async def unregister_worker(body: UnregisterWorkerRequest, ctl: Ctl) -> dict[str, bool]:
        return {"removed": await ctl.unregister(body.worker_name)}

    @app.post("/refresh_all_workers", response_model=ListModelsResponse)
    async def refresh_all_workers(ctl: Ctl) -> ListModelsResponse:
        await ctl.refresh_all()
        return ListModelsResponse(models=await ctl.list_models())

    @app.post("/list_models", response_model=ListModelsResponse)
    async def list_models(ctl: Ctl) -> ListModelsResponse:
        return ListModelsResponse(models=await ctl.list_models())

    @app.post("/list_multimodal_models", response_model=ListModelsResponse)
    async def list_multimodal_models(ctl: Ctl) -> ListModelsResponse:
        return ListModelsResponse(models=await ctl.list_models(multimodal=True))

    @app.post("/list_language_models", response_model=ListModelsResponse)
    async def list_language_models(ctl: Ctl) -> ListModelsResponse:
        return ListModelsResponse(models=await ctl.list_models(multimodal=False))

    @app.post("/get_worker_address", response_model=WorkerAddressResponse)
    async def get_worker_address(body: ModelRequest, ctl: Ctl) -> Response:
        answer, route = await ctl.worker_address(
            RouteRequest(body.model, body.prompt, body.session_id)
        )
        headers = {ROUTE_HEADER: route.header()} if route is not None else None
        return Response(json.dumps(answer), media_type="application/json", headers=headers)

    @app.post("/worker_get_status")
    async def worker_get_status(ctl: Ctl) -> dict[str, Any]:
        return await ctl.aggregate_status()

    @app.post("/worker_generate_stream")
    @app.post("/worker_api_generate_stream")
    async def worker_generate_stream(
        ctl: Ctl, params: Annotated[dict[str, Any], Body()]
    ) -> Response:
        model = params.get("model")
        if not isinstance(model, str) or not model:
            return error_response(
                400, ErrorCode.VALIDATION_TYPE_ERROR, "model: a non-empty string is required", True
            )
        upstream = await ctl.open_stream(model, params)
        if upstream is None:
            text = f"no worker serves model {model!r}; models: {await ctl.list_models()}"
            return error_response(404, ErrorCode.CONTROLLER_NO_WORKER, text, framed=True)
        return await relay(upstream)

    @app.get("/test_connection")
    async def test_connection() -> str:
        return "success"

    # -- pagedserve's own -------------------------------------------------------------------

    @app.get("/workers", response_model=WorkersResponse)
    async def workers(ctl: Ctl) -> WorkersResponse:
        return WorkersResponse(workers=await ctl.workers())

    @app.post("/workers/{worker_id}/drain", response_model=DrainResponse)
    async def drain(worker_id: str, ctl: Ctl) -> Response | DrainResponse:
        info = await ctl.drain(worker_id)
        if info is None:
            return error_response(
                404, ErrorCode.VALIDATION_TYPE_ERROR, f"unknown worker id {worker_id!r}"
            )
        return DrainResponse(
            worker_id=info.worker_id, worker_name=info.worker_name, status="draining"
        )

    @app.get("/health")
    async def health(ctl: Ctl) -> dict[str, str]:
        await ctl.store.ping()  # StoreError -> 503
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(ctl: Ctl) -> Response:
        return PlainTextResponse(ctl.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def relay(upstream: httpx.Response) -> Response:
    """Pass a worker's stream through byte for byte (its NUL framing included); an error status
    from the worker passes through whole. Closing the client's connection closes upstream's."""
    if upstream.status_code != 200:
        try:
            body = await upstream.aread()
        finally:
            await upstream.aclose()
        return Response(body, status_code=upstream.status_code, media_type="application/json")

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:
            body = {
                "text": f"worker stream broke: {e}",
                "error_code": int(ErrorCode.CONTROLLER_WORKER_TIMEOUT),
            }
            yield json.dumps(body).encode() + b"\0"
        finally:
            await upstream.aclose()

    return StreamingResponse(chunks(), media_type="application/octet-stream")
