"""The controller's hot routes in plain ASGI, in front of the FastAPI app.

Every request a FastChat client makes asks `/get_worker_address` (or `/list_models`), and
every worker posts `/receive_heart_beat` every few seconds: at 20,000 workers that is 4,000
heartbeats a second before any request. FastAPI's routing, dependency injection and response
models cost several times the work these routes do, so they are answered here: the body is
validated with the same pydantic models (in pydantic's compiled JSON parser), the same
`Controller` methods answer, and errors take the same form as the app's. The FastAPI app keeps
its own routes for these paths, which document them in /openapi.json; every other path and
method goes on to it. With a control token, the heartbeat needs it here too (the app's
ControlTokenGate is behind this).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from pagedserve.controller.app import OPEN_PATHS, error_response, unauthorized, validation_text
from pagedserve.controller.dispatch import ROUTE_HEADER, RouteRequest
from pagedserve.controller.registry import Controller
from pagedserve.controller.store import StoreError
from pagedserve.protocol.control_token import ControlTokenGate
from pagedserve.protocol.fastchat import ErrorCode
from pagedserve.protocol.registry import HeartbeatRequest, ModelRequest


class _BodyTooLarge(Exception):
    pass


def _json(payload: dict, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(body, media_type="application/json", headers=headers)


async def _worker_address(ctl: Controller, req: ModelRequest) -> Response:
    answer, route = await ctl.worker_address(RouteRequest(req.model, req.prompt, req.session_id))
    return _json(answer, {ROUTE_HEADER: route.header()} if route is not None else None)


async def _heartbeat(ctl: Controller, req: HeartbeatRequest) -> Response:
    return _json({"exist": await ctl.heartbeat(req)})


async def _list_models(ctl: Controller, req: None) -> Response:
    return _json({"models": await ctl.list_models()})


_ROUTES: dict[str, tuple[type[BaseModel] | None, Callable[..., Awaitable[Response]]]] = {
    "/get_worker_address": (ModelRequest, _worker_address),
    "/receive_heart_beat": (HeartbeatRequest, _heartbeat),
    "/list_models": (None, _list_models),
}


class HotRoutes:
    """ASGI app: the controller's three hot POST routes, everything else to `app`."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        # the app's own limit (its BodyLimit middleware), here in FastChat's error format
        self.max_body = app.state.config.max_body_bytes
        token = app.state.config.control_token
        self.gate = ControlTokenGate(app, token, OPEN_PATHS, unauthorized) if token else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        route = _ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.gate is not None and not self.gate.allows(scope):
            await unauthorized(scope)(scope, receive, send)
            return
        model, answer = route
        try:
            body = await _read_body(scope, receive, self.max_body)
            request = model.model_validate_json(body) if model is not None else None
            response = await answer(self.app.state.controller, request)
        except ValidationError as e:
            response = error_response(400, ErrorCode.VALIDATION_TYPE_ERROR, validation_text(e))
        except _BodyTooLarge:
            text = f"request body larger than {self.max_body} bytes"
            response = error_response(413, ErrorCode.VALIDATION_TYPE_ERROR, text)
        except StoreError as e:
            response = error_response(503, ErrorCode.INTERNAL_ERROR, str(e))
        await response(scope, receive, send)


async def _read_body(scope: dict, receive: Callable, limit: int) -> bytes:
    """The request's body, refused as soon as it is known to pass `limit` (never read whole)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
