"""What every pagedserve HTTP server does about slow and oversized clients.

uvicorn gives a client all the time it wants to send a request's headers (its keep-alive
timer only runs between requests, and any byte stops it), so a client that sends one header
byte a second holds a connection forever, and enough of them hold every file descriptor.
`run` (or `LimitedConfig` for a uvicorn.Server of one's own) starts uvicorn with protocols that
give each request `header_timeout` seconds to send its whole header block, from the
connection's start or, on a kept-alive connection, from the request's first byte; past it a
client that sent part of a request gets 408, and the connection is closed.

`BodyLimit` refuses a request body larger than `max_bytes` with 413 before the app sees it: at
once when Content-Length says so, else as soon as the bytes received pass the limit, so that a
large body is never held in memory whole.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
import uvicorn
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import Multiprocess

_TIMEOUT_TEXT = b"The request headers took too long.\n"
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_TEXT), _TIMEOUT_TEXT)
)


class LimitedConfig(uvicorn.Config):
    """uvicorn's Config plus `header_timeout`, which the protocols below read."""

    def __init__(self, app: Any, header_timeout: float, **options: Any) -> None:
        if header_timeout <= 0:
            raise ValueError(f"header_timeout must be > 0 seconds; got {header_timeout}")
        self.header_timeout = header_timeout
        http = options.pop("http", "auto")
        if http == "auto":
            http = "httptools" if "httptools" in _PROTOCOLS else "h11"
        super().__init__(app, http=_PROTOCOLS[http], **options)


class _HeaderDeadline:
    """The deadline of a request's headers: from the connection's start, or from the first
    byte of a later request on a kept-alive connection (between requests uvicorn's keep-alive
    timeout rules, and closes quietly). On expiry a client that sent part of a request gets
    408; one that sent nothing is closed quietly, as an idle keep-alive connection is, so that
    no client's pool ever holds an answer it did not ask for."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    config: LimitedConfig
    _header_timer: asyncio.TimerHandle | None = None
    _awaiting_headers = True
    _got_bytes = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers:
            self._got_bytes = True
            if self._header_timer is None:
                self._arm()
        super().data_received(data)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._awaiting_headers, self._got_bytes = True, False  # armed by the next byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _headers_complete(self) -> None:
        self._awaiting_headers, self._got_bytes = False, False
        self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.config.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self._awaiting_headers and not self.transport.is_closing():
            if self._got_bytes:
                self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()


class _H11(_HeaderDeadline, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        if self._awaiting_headers and self.conn.their_state is not h11.IDLE:
            self._headers_complete()  # h11 has parsed the request line and headers


try:  # uvicorn[standard] brings httptools; without it, h11 alone
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover
    HttpToolsProtocol = None


if HttpToolsProtocol is not None:

    class _HttpTools(_HeaderDeadline, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            self._headers_complete()
            super().on_headers_complete()

    _PROTOCOLS: dict[str, type] = {"h11": _H11, "httptools": _HttpTools}
else:  # pragma: no cover
    _PROTOCOLS = {"h11": _H11}


def run(app: Any, header_timeout: float, workers: int = 1, **options: Any) -> None:
    """uvicorn.run with the header deadline; `app` is an import string when `workers` > 1."""
    config = LimitedConfig(app, header_timeout, workers=workers, **options)
    server = uvicorn.Server(config)
    if workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server.run()


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, without reading it all."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1; got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        text = f"The request body is larger than this server's limit of {self.max_bytes} bytes."
        body = json.dumps(
            {
                "error": {
                    "message": text,
                    "type": "invalid_request_error",
                    "code": "request_too_large",
                }
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """Raised from receive() once the body passes the limit. An HTTPException, so that a
    framework that wraps errors met while parsing a body (FastAPI makes them 400) lets it
    through as the 413 it is; BodyLimit answers it itself when the app did not."""

    def __init__(self) -> None:
        super().__init__(413, "The request body is too large.")
