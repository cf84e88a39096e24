"""The gateway's one HTTP client: httpx's API over a lean HTTP/1.1 transport of its own.

Profiled at 64 requests in flight, httpx's default stack (httpcore's pool, h11's state machine,
an anyio cancel scope around every read and write, a cookie jar consulted on every answer) took
about half of the gateway's CPU per request. The gateway only ever talks plain HTTP/1.1 to its
own workers and controller, so `Http11Transport` does just that on asyncio streams: a keep-alive
pool per host (a deque, O(1) either way), a request written in one call, the status line and
headers read in one, bodies framed by Content-Length, chunks or the connection's end.
`UpstreamClient.send_direct` writes a POST to it straight from its arguments, without an
httpx.Request or the client's redirect, auth, cookie and event-hook machinery. Every other use of the client (and https URLs, through
httpx's own transport) behaves as httpx does. Errors are httpx's: ConnectError, ConnectTimeout,
ReadTimeout, ReadError, RemoteProtocolError.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

import httpx

from pagedserve.protocol.control_token import control_headers

_READ_SIZE = 64 << 10
_NO_BODY_STATUS = (204, 304)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


async def _timed(step, seconds: float | None, error: type[httpx.TimeoutException]):
    """`await step`, or `error` after `seconds` (None: no limit, and no timer to pay for)."""
    if seconds is None:
        return await step
    try:
        return await asyncio.wait_for(step, seconds)
    except asyncio.TimeoutError as e:
        raise error(f"no answer within {seconds} s") from e


class _Body(httpx.AsyncByteStream):
    """An answer's body, read as the caller asks for it; the connection goes back to the pool
    once the body is read to its end, and is closed if the caller stops before."""

    def __init__(
        self,
        pool: Http11Transport,
        key: tuple[str, int],
        conn: _Connection,
        length: int | None,
        chunked: bool,
        keep_alive: bool,
        read_timeout: float | None,
    ) -> None:
        self._pool, self._key, self._conn = pool, key, conn
        self._length, self._chunked = length, chunked
        self._keep_alive = keep_alive and (chunked or length is not None)
        self._timeout = read_timeout
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader, timeout = self._conn.reader, self._timeout
        try:
            if self._chunked:
                while True:
                    line = await _timed(reader.readuntil(b"\r\n"), timeout, httpx.ReadTimeout)
                    size = int(line.split(b";", 1)[0], 16)
                    if size == 0:
                        while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                            pass
                        break
                    data = await _timed(reader.readexactly(size + 2), timeout, httpx.ReadTimeout)
                    yield data[:-2]
            elif self._length is not None:
                left = self._length
                while left:
                    data = await _timed(
                        reader.read(min(left, _READ_SIZE)), timeout, httpx.ReadTimeout
                    )
                    if not data:
                        raise httpx.RemoteProtocolError("the server closed the connection mid-body")
                    left -= len(data)
                    yield data
            else:  # delimited by the connection's end
                while data := await _timed(reader.read(_READ_SIZE), timeout, httpx.ReadTimeout):
                    yield data
            self._complete = True
        except asyncio.IncompleteReadError as e:
            raise httpx.RemoteProtocolError("the server closed the connection mid-body") from e
        except (ValueError, asyncio.LimitOverrunError) as e:
            raise httpx.RemoteProtocolError(f"malformed chunked body: {e}") from e
        except OSError as e:
            raise httpx.ReadError(str(e) or repr(e)) from e

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is None:
            return
        if self._complete and self._keep_alive:
            self._pool._release(self._key, conn)
        else:  # the worker sees the connection drop, and aborts the request
            conn.close()


class Http11Transport(httpx.AsyncBaseTransport):
    """Plain HTTP/1.1 with keep-alive; https goes to httpx's own transport. Connections are not
    capped here: the gateway's concurrency limit bounds the requests in flight, and at most
    `max_keepalive` idle connections are kept per host."""

    def __init__(self, max_keepalive: int = 256) -> None:
        self.max_keepalive = max_keepalive
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._tls: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            if self._tls is None:
                self._tls = httpx.AsyncHTTPTransport()
            return await self._tls.handle_async_request(request)
        head = self._head(request, await request.aread())
        timeouts = request.extensions.get("timeout", {})
        return await self._send((url.host, url.port or 80), head, request, timeouts)

    async def post(
        self, url: httpx.URL, body: bytes, headers: dict[str, str], timeouts: dict
    ) -> httpx.Response:
        """A POST without an httpx.Request: the head is written straight from the arguments."""
        if url.scheme != "http":
            request = httpx.Request(
                "POST", url, content=body, headers=headers, extensions={"timeout": timeouts}
            )
            return await self.handle_async_request(request)
        lines = [b"POST " + url.raw_path + b" HTTP/1.1", b"Host: " + url.netloc]
        lines += [f"{name}: {value}".encode("latin-1") for name, value in headers.items()]
        lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
        return await self._send(
            (url.host, url.port or 80), b"\r\n".join(lines) + body, None, timeouts
        )

    async def _send(
        self, key: tuple[str, int], head: bytes, request: httpx.Request | None, timeouts: dict
    ) -> httpx.Response:
        conn = self._idle_connection(key)
        if conn is not None:
            try:
                return await self._exchange(key, conn, request, head, timeouts)
            except _StaleConnection:
                pass  # closed by the worker while idle, before it read the request: send anew
        conn = await self._connect(key, timeouts.get("connect"))
        try:
            return await self._exchange(key, conn, request, head, timeouts)
        except _StaleConnection as e:
            raise httpx.RemoteProtocolError(
                "the server closed the connection without answering"
            ) from e

    @staticmethod
    def _head(request: httpx.Request, body: bytes) -> bytes:
        """The request as sent: line, headers, body (a streamed body is sent whole)."""
        lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
        for name, value in request.headers.raw:
            if name.lower() == b"transfer-encoding":
                lines.append(b"Content-Length: %d" % len(body))
            else:
                lines.append(name + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def _idle_connection(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable():
                conn.reused = True
                return conn
            conn.close()
        return None

    def _release(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, deque())
        if len(idle) < self.max_keepalive and conn.usable():
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, key: tuple[str, int], timeout: float | None) -> _Connection:
        try:
            reader, writer = await _timed(
                asyncio.open_connection(*key, limit=_READ_SIZE), timeout, httpx.ConnectTimeout
            )
        except OSError as e:
            raise httpx.ConnectError(str(e) or repr(e)) from e
        return _Connection(reader, writer)

    async def _exchange(
        self,
        key: tuple[str, int],
        conn: _Connection,
        request: httpx.Request | None,
        head: bytes,
        timeouts: dict,
    ) -> httpx.Response:
        read_timeout = timeouts.get("read")
        try:
            try:
                conn.writer.write(head)
                await conn.writer.drain()
                raw = await _timed(
                    conn.reader.readuntil(b"\r\n\r\n"), read_timeout, httpx.ReadTimeout
                )
                while raw[9:10] == b"1" and raw[9:12] != b"101":  # 100 Continue and the like
                    raw = await _timed(
                        conn.reader.readuntil(b"\r\n\r\n"), read_timeout, httpx.ReadTimeout
                    )
            except asyncio.IncompleteReadError as e:
                if conn.reused and not e.partial:
                    raise _StaleConnection from e
                raise httpx.RemoteProtocolError(
                    "the server closed the connection mid-answer"
                ) from e
            except (ConnectionError, BrokenPipeError) as e:
                if conn.reused:
                    raise _StaleConnection from e
                raise httpx.ReadError(str(e) or repr(e)) from e
            except asyncio.LimitOverrunError as e:
                raise httpx.RemoteProtocolError("the answer's headers are too large") from e
            except OSError as e:
                raise httpx.ReadError(str(e) or repr(e)) from e
            return self._response(key, conn, request, raw, read_timeout)
        except BaseException:
            conn.close()  # mid-exchange (an error, a timeout, a cancelled caller): unusable
            raise

    def _response(
        self,
        key: tuple[str, int],
        conn: _Connection,
        request: httpx.Request | None,
        raw: bytes,
        read_timeout: float | None,
    ) -> httpx.Response:
        status_line, *lines = raw[:-4].split(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise httpx.RemoteProtocolError(f"not an HTTP/1.x answer: {status_line[:100]!r}")
        status = int(code)
        headers = []
        length: int | None = None
        chunked = False
        keep_alive = version == b"HTTP/1.1"
        for line in lines:
            name, sep, value = line.partition(b":")
            if not sep:
                raise httpx.RemoteProtocolError(f"malformed header line {line[:100]!r}")
            name, value = name.strip(), value.strip()
            headers.append((name, value))
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit():
                    raise httpx.RemoteProtocolError(f"bad Content-Length {value[:40]!r}")
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif lower == b"connection":
                keep_alive = value.lower() != b"close" and keep_alive
        if status in _NO_BODY_STATUS or (request is not None and request.method == "HEAD"):
            length, chunked = 0, False
        body = _Body(
            self, key, conn, None if chunked else length, chunked, keep_alive, read_timeout
        )
        return httpx.Response(
            status,
            headers=headers,
            stream=body,
            request=request,
            extensions={"http_version": version, "reason_phrase": reason},
        )

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        if self._tls is not None:
            await self._tls.aclose()


class _StaleConnection(Exception):
    """A kept-alive connection the server had closed before it read the request."""


class UpstreamClient(httpx.AsyncClient):
    """httpx's client, plus `send_direct` for the gateway's per-request hop to a worker. Every
    call, direct or not, presents the control token when there is one (and only it: a client's
    own Authorization header, its API key, is never passed on)."""

    def __init__(
        self, transport: Http11Transport, control_token: str | None = None, **kwargs
    ) -> None:
        self.control = control_headers(control_token)
        super().__init__(transport=transport, headers=self.control, **kwargs)
        self.transport = transport
        self.timeouts = self.timeout.as_dict()

    async def send_direct(
        self, url: httpx.URL, body: bytes, headers: dict[str, str]
    ) -> httpx.Response:
        """POST `body`: the answer's head, its body to stream (read it, then aclose). No
        httpx.Request, redirects, auth, cookies or event hooks."""
        if self.control:
            headers = {**headers, **self.control}
        return await self.transport.post(url, body, headers, self.timeouts)


def make_client(
    connect_timeout: float, max_keepalive: int, control_token: str | None = None
) -> UpstreamClient:
    """No read timeout: the gateway bounds first bytes and whole requests itself."""
    return UpstreamClient(
        Http11Transport(max_keepalive),
        control_token,
        timeout=httpx.Timeout(None, connect=connect_timeout, pool=connect_timeout),
    )
