"""What the gateway knows about one request, and the ASGI middleware around every request:
the request id (the client's X-Request-Id when it is sane, a new one otherwise; sent to the
worker and returned in the response), the API key check, and one structured access-log line
plus the request metrics when the response has ended (streams included)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.api_gateway.auth import ApiKey, KeyRing
from pagedserve.api_gateway.errors import GatewayError
from pagedserve.api_gateway.metrics import GatewayMetrics
from pagedserve.protocol.openai import REQUEST_ID_HEADER as REQUEST_ID_HEADER
from pagedserve.protocol.openai import SANE_REQUEST_ID

access_log = logging.getLogger("pagedserve.api_gateway.access")

API_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")


@dataclass
class RequestContext:
    request_id: str
    started: float = field(default_factory=time.monotonic)
    key: ApiKey | None = None
    model: str | None = None  # set once the model is known to the routing view
    stream: bool = False
    worker: str | None = None
    retries: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft: float | None = None
    error: str | None = None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing | None,
        public_paths: set[str],
        metrics: GatewayMetrics,
    ) -> None:
        self.app = app
        self.keys = keys
        self.public_paths = public_paths
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given and SANE_REQUEST_ID.fullmatch(given) else f"req-{uuid.uuid4().hex}"
        ctx = RequestContext(request_id=rid)
        scope.setdefault("state", {})["ctx"] = ctx
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if self.keys is not None and scope["path"] not in self.public_paths:
                try:
                    ctx.key = self.keys.authenticate(_header(scope, b"authorization"))
                except GatewayError as e:
                    ctx.error = e.code
                    await e.response()(scope, receive, send_with_id)
                    return
            await self.app(scope, receive, send_with_id)
        finally:
            self._finish(scope, ctx, status)

    def _finish(self, scope: Scope, ctx: RequestContext, status: int) -> None:
        elapsed = time.monotonic() - ctx.started
        path = scope["path"]
        if path in API_ROUTES or path.startswith("/v1/models/"):
            route = "/v1/models" if path.startswith("/v1/models") else path
            model = ctx.model or "-"
            self.metrics.requests.labels(route, model, str(status)).inc()
            if status < 400:
                self.metrics.latency.labels(route, model).observe(elapsed)
        if path in ("/health", "/metrics") and status < 400:
            return  # probes and scrapes would drown the log
        entry = {
            "request_id": ctx.request_id,
            "method": scope.get("method"),
            "path": path,
            "status": status,
            "latency_ms": round(elapsed * 1000, 2),
            "key": ctx.key.name if ctx.key else None,
            "model": ctx.model,
            "stream": ctx.stream,
            "worker": ctx.worker,
            "retries": ctx.retries,
            "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": ctx.completion_tokens,
            "ttft_ms": round(ctx.ttft * 1000, 2) if ctx.ttft is not None else None,
            "error": ctx.error,
        }
        access_log.info(json.dumps(entry, separators=(",", ":")))
