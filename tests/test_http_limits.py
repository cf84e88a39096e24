"""deploy/http_limits.py on a real socket: the header deadline for slow and silent clients (and
none for an idle kept-alive connection, whose client's pool must never read an answer it did
not ask for), and the body limit, with either HTTP parser."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from servers import free_port, wait_until

from pagedserve.deploy.http_limits import BodyLimit, LimitedConfig

TIMEOUT = 0.5
LIMIT = 1000


@pytest.fixture(params=["h11", "httptools"])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=LIMIT)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    port = free_port()
    config = LimitedConfig(
        app, TIMEOUT, host="127.0.0.1", port=port, http=request.param, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(url + "/health").status_code == 200, 10, what="server up")
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_headers_sent_too_slowly_get_408_and_the_connection_closed(url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as s:
        started = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert s.recv(4096) == b""
        assert TIMEOUT - 0.1 <= time.monotonic() - started < TIMEOUT + 2


def test_a_silent_connection_is_closed_without_an_answer(url: str) -> None:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=5) as s:
        assert s.recv(4096) == b""


def test_a_kept_alive_connection_is_not_sent_a_408_between_requests(url: str) -> None:
    with httpx.Client(base_url=url) as client:
        assert client.get("/health").status_code == 200
        time.sleep(TIMEOUT * 3)  # past the header deadline, within uvicorn's keep-alive
        assert client.get("/health").status_code == 200


def test_bodies_over_the_limit_get_413_with_or_without_a_length(url: str) -> None:
    assert httpx.post(url + "/echo", content=b"x" * LIMIT).json() == {"bytes": LIMIT}
    r = httpx.post(url + "/echo", content=b"x" * (LIMIT + 1))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url + "/echo", content=iter([b"x" * 600, b"x" * 600]))  # chunked
    assert r.status_code == 413
