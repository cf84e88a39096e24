"""Errors the gateway answers itself, in OpenAI's shape:
{"error": {"message", "type", "param", "code"}} with the status OpenAI would send."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from pagedserve.protocol.openai import ErrorDetail, ErrorResponse


class GatewayError(Exception):
    """A request the gateway refuses or cannot complete; nothing was sent to the client yet."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorDetail(
                message=self.message, type=self.type, param=self.param, code=self.code
            )
        )

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=headers)


def error_event(message: str, code: str, type: str = "server_error") -> bytes:
    """An SSE event that ends a stream which failed after its first byte."""
    body = ErrorResponse(error=ErrorDetail(message=message, type=type, code=code))
    return b"data: " + body.model_dump_json().encode() + b"\n\n"


def _loc(parts: tuple[int | str, ...]) -> str | None:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def invalid_body(e: ValidationError) -> GatewayError:
    """A 400 for a body that is not JSON, not an object, or has wrong types or values."""
    errors = e.errors(include_url=False)
    if any(err["type"] == "json_invalid" for err in errors):
        return GatewayError(
            400,
            "We could not parse the JSON body of your request. The body must be a JSON object "
            "(Content-Type: application/json).",
            code="invalid_json",
        )
    if any(err["type"] == "model_type" and not err["loc"] for err in errors):
        return GatewayError(400, "The request body must be a JSON object.", code="invalid_body")
    # Union members each report their own mismatch; say each place once.
    seen: dict[str | None, str] = {}
    for err in errors:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _is_union_tag(p)))
        where = _loc(loc)
        seen.setdefault(where, err["msg"])
    parts = [f"{where or 'body'}: {msg}" for where, msg in list(seen.items())[:5]]
    param = next(iter(seen))
    return GatewayError(400, "Invalid request: " + "; ".join(parts), param=param)


def _is_union_tag(part: str) -> bool:
    """pydantic names union members in error locations ('str', 'list[int]', 'TextContentPart');
    OpenAI's field names are all lower-case words."""
    return "[" in part or part[:1].isupper() or part in {"str", "int", "float", "bool", "none"}
