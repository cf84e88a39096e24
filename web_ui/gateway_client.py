"""The arena's only way out: OpenAI's API on the gateway, over one shared httpx client.

`list_models()` reads /v1/models; `stream_chat()` posts /v1/chat/completions with
`stream: true` and yields the answer's text piece by piece. Every failure (connection refused,
timeout, rate limit, unknown model, 4xx/5xx, an error event in the stream, a stream cut short)
becomes a `GatewayError` whose message a person can read in the chat.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from pagedserve.controller.dispatch import SESSION_HEADER

logger = logging.getLogger(__name__)


class GatewayError(Exception):
    """A request to the gateway failed; `str(e)` is meant for the person in the UI."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ChatParams:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2]; got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1; got {self.max_tokens}")


@dataclass
class StreamResult:
    """Filled in while a stream runs: why it ended (OpenAI's finish_reason)."""

    finish_reason: str | None = None


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:500]


def describe_status(status: int, message: str, model: str | None) -> str:
    """A sentence for a person about an HTTP error from the gateway."""
    who = f"model {model!r}" if model else "the gateway"
    if status == 429:
        hint = "" if "try again" in message.lower() else " Wait a moment, then try again."
        return f"Rate limit reached (HTTP 429) for {who}: {message}{hint}"
    if status in (401, 403):
        return f"The gateway refused the API key (HTTP {status}): {message}"
    if status == 404:
        return f"The {who} is not available right now (HTTP 404): {message}"
    if status == 400 or status == 413 or status == 422:
        return f"The {who} refused this request (HTTP {status}): {message}"
    if status >= 500:
        return f"The {who} is down or overloaded (HTTP {status}): {message}"
    return f"The gateway answered HTTP {status}: {message}"


class GatewayClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _unreachable(self, e: Exception) -> GatewayError:
        if isinstance(e, httpx.TimeoutException):
            return GatewayError(f"The gateway at {self.base_url} did not answer in time ({e!r}).")
        return GatewayError(
            f"Cannot reach the gateway at {self.base_url} ({type(e).__name__}: {e}). Is it running?"
        )

    async def list_models(self) -> list[str]:
        try:
            r = await self._http.get("/v1/models")
        except httpx.HTTPError as e:
            raise self._unreachable(e) from e
        if r.status_code != 200:
            raise GatewayError(
                describe_status(r.status_code, _error_message(_json(r)), None), r.status_code
            )
        try:
            return [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError) as e:
            raise GatewayError(f"The gateway's /v1/models answer is not OpenAI's shape: {e}") from e

    async def stream_chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        params: ChatParams,
        result: StreamResult | None = None,
        session_id: str | None = None,
    ) -> AsyncIterator[str]:
        """Yield the answer's text as it streams; raise GatewayError on any failure.
        `session_id` keeps a conversation's turns on one worker (its cached prefix)."""
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        result = result if result is not None else StreamResult()
        started = False
        try:
            headers = {SESSION_HEADER: session_id} if session_id else None
            async with self._http.stream(
                "POST", "/v1/chat/completions", json=body, headers=headers
            ) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise GatewayError(
                        describe_status(r.status_code, _error_message(_json(r)), model),
                        r.status_code,
                    )
                done = False
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise GatewayError(
                            f"The model {model!r} failed while answering: {_error_message(chunk)}"
                        )
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            started = True
                            yield text
                        if choice.get("finish_reason"):
                            result.finish_reason = choice["finish_reason"]
                if not done:
                    raise GatewayError(
                        f"The answer of {model!r} was cut off: the connection closed early."
                    )
        except httpx.HTTPError as e:
            if started:
                raise GatewayError(
                    f"The connection to the gateway broke while {model!r} was answering "
                    f"({type(e).__name__}: {e})."
                ) from e
            raise self._unreachable(e) from e
        except json.JSONDecodeError as e:
            raise GatewayError(f"The gateway sent a stream event that is not JSON: {e}") from e


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text
