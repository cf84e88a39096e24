"""The worker's HTTP app: FastChat's worker routes, OpenAI's /v1 routes, health and metrics.

`create_app(config)` builds it; the engine loads in the background after start-up (so /health
answers at once and /ready turns 200 when the model is in), and the HTTP client, the engine
and the controller link are all closed by the lifespan.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from pagedserve.deploy.http_limits import BodyLimit
from pagedserve.protocol.control_token import ControlTokenGate, control_headers
from pagedserve.protocol.fastchat import CountTokenRequest, ErrorCode, GenerateParams
from pagedserve.protocol.openai import (
    REQUEST_ID_HEADER,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorDetail,
    ErrorResponse,
    ModelList,
)
from pagedserve.worker.config import WorkerConfig
from pagedserve.worker.model_worker import EngineFactory, ModelWorker, default_engine_factory
from pagedserve.worker.requests import RequestError, until_disconnected

logger = logging.getLogger(__name__)


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def error_response(request: Request, e: RequestError) -> Response:
    """OpenAI's error object on /v1 routes; FastChat's {"text", "error_code"} elsewhere (with
    the NUL byte that ends a message on the streaming route)."""
    if _is_openai(request):
        body = ErrorResponse(
            error=ErrorDetail(
                message=e.message, type=e.openai_type, param=e.param, code=e.openai_code
            )
        )
        return JSONResponse(body.model_dump(), status_code=e.status)
    payload = json.dumps({"text": e.message, "error_code": int(e.error_code)}).encode()
    if request.url.path == "/worker_generate_stream":
        return Response(
            payload + b"\0", status_code=e.status, media_type="application/octet-stream"
        )
    return Response(payload, status_code=e.status, media_type="application/json")


# With a control token, every other path needs it (the generate routes, status, templates, the
# API docs); these stay open for probes and scrapers.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


def unauthorized(scope: dict) -> Response:
    text = (
        "this worker needs the control token: Authorization: Bearer TOKEN "
        "(--control-token or $PAGEDSERVE_CONTROL_TOKEN)"
    )
    e = RequestError(
        401, text, error_code=ErrorCode.INVALID_AUTH_KEY, openai_code="invalid_api_key"
    )
    return error_response(Request(scope), e)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


def _worker(request: Request) -> ModelWorker:
    return request.app.state.worker


Worker = Annotated[ModelWorker, Depends(_worker)]


def create_app(config: WorkerConfig, engine_factory: EngineFactory | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Its calls go to the controller (controller_link.py), presenting the control token.
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, connect=5.0),
            headers=control_headers(config.control_token),
        )
        logger.info("control token: %s", "on" if config.control_token else "off")
        worker = ModelWorker(config, client, engine_factory or default_engine_factory(config))
        worker.on_fatal = getattr(app.state, "on_fatal", None)
        app.state.worker = worker
        loading = asyncio.create_task(worker.start(), name="worker-start")
        try:
            yield
        finally:
            if not loading.done():
                worker.state = "stopped"
                await asyncio.gather(loading, return_exceptions=True)
            await worker.stop()
            await client.aclose()

    # FastChat's workers read JSON whatever the content type says.
    app = FastAPI(title="pagedserve worker", lifespan=lifespan, strict_content_type=False)
    app.state.config = config
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.control_token:  # outermost: a refused request's body is never read
        app.add_middleware(
            ControlTokenGate,
            token=config.control_token,
            open_paths=OPEN_PATHS,
            refuse=unauthorized,
        )

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> Response:
        _worker(request).metrics.requests.labels(
            request.url.path, "bad_request" if exc.status < 500 else "unavailable"
        ).inc()
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        message, param = validation_message(exc)
        return error_response(
            request,
            RequestError(400, message, param=param, error_code=ErrorCode.VALIDATION_TYPE_ERROR),
        )

    # -- process state ----------------------------------------------------------------------

    @app.get("/health")
    async def health(w: Worker) -> JSONResponse:
        """Liveness: 503 once the worker has failed (its process is on its way out)."""
        failed = w.state == "failed"
        body = {"status": "failed" if failed else "ok", "state": w.state}
        return JSONResponse(body, status_code=503 if failed else 200)

    @app.get("/ready")
    async def ready(w: Worker) -> JSONResponse:
        body = w.readiness()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def metrics(w: Worker) -> Response:
        return PlainTextResponse(w.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # -- FastChat's worker protocol ---------------------------------------------------------

    @app.post("/worker_get_status")
    async def worker_get_status(w: Worker) -> dict[str, Any]:
        return w.status().model_dump(exclude_none=True)

    @app.post("/count_token")
    async def count_token(body: CountTokenRequest, w: Worker) -> dict[str, int]:
        return w.loaded()[0].count_token(body.prompt)

    @app.post("/worker_get_conv_template")
    async def worker_get_conv_template(w: Worker) -> dict[str, Any]:
        return w.loaded()[0].conv_template()

    @app.post("/model_details")
    async def model_details(w: Worker) -> dict[str, int]:
        return w.loaded()[0].model_details()

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(
        params: GenerateParams, request: Request, w: Worker
    ) -> StreamingResponse:
        start = w.serving()[0].generate_stream(params, "/worker_generate_stream")
        frames = await until_disconnected(request, start)
        return StreamingResponse(frames, media_type="application/octet-stream")

    @app.post("/worker_generate")
    async def worker_generate(
        params: GenerateParams, request: Request, w: Worker
    ) -> dict[str, Any]:
        return await until_disconnected(
            request, w.serving()[0].generate(params, "/worker_generate")
        )

    # -- OpenAI's API -------------------------------------------------------------------------

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(w: Worker) -> ModelList:
        return w.loaded()[1].models()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, w: Worker) -> Any:
        rid = request.headers.get(REQUEST_ID_HEADER)
        return await openai_response(request, w.serving()[1].completions(body, rid))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, w: Worker) -> Any:
        rid = request.headers.get(REQUEST_ID_HEADER)
        return await openai_response(request, w.serving()[1].chat(body, rid))

    return app


async def openai_response(request: Request, work: Any) -> Response | BaseModel:
    """Stream (SSE) or collect; a client gone while collecting aborts the generation."""
    result = await until_disconnected(request, work)
    if isinstance(result, BaseModel):
        return result
    return StreamingResponse(
        result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
