"""The gateway's scale from zero alone: a fake supervisor and controller behind one mock
transport. The whole path with real processes is in test_autoscale_stack.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pagedserve.api_gateway import cold_start
from pagedserve.api_gateway.cold_start import ColdStarts
from pagedserve.api_gateway.errors import GatewayError
from pagedserve.api_gateway.routing import RoutingTable
from pagedserve.protocol.control_token import control_headers


class Stack:
    """Serves `served`; a woken model gets a worker after `start_polls` looks at /workers."""

    def __init__(self, served: set[str], start_polls: int = 3) -> None:
        self.served = served
        self.start_polls = start_polls
        self.wakes: list[tuple[str, str | None]] = []
        self.polls = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith("/admin/models/") and path.endswith("/wake"):
            model = path.split("/")[3]
            self.wakes.append((model, request.headers.get("authorization")))
            if model not in self.served:
                return httpx.Response(404, json={"error": {"message": "unknown model"}})
            return httpx.Response(200, json={"model": model, "replicas": 1})
        assert path == "/workers"
        self.polls += 1
        up = self.wakes and self.polls > self.start_polls
        workers = [
            {"worker_name": "http://127.0.0.1:1", "worker_id": f"{m}-0", "model_names": [m]}
            for m, _ in self.wakes
            if up and m in self.served
        ]
        return httpx.Response(200, json={"workers": workers})


def wake_all(stack: Stack, models: list[str], timeout: float = 10.0) -> list[object]:
    async def scenario() -> list[object]:
        transport = httpx.MockTransport(stack.handler)
        # as the gateway's client: it presents the control token on every call
        headers = control_headers("t" * 16)
        async with httpx.AsyncClient(transport=transport, headers=headers) as client:
            table = RoutingTable(client, "http://ctl", refresh_interval=60, timeout=1,
                                 min_refresh_gap=0)  # fmt: skip
            starts = ColdStarts(client, table, "http://sup/", timeout)
            return await asyncio.gather(*(starts.wake(m) for m in models), return_exceptions=True)

    return asyncio.run(scenario())


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cold_start, "POLL_INTERVAL", 0.01)


def test_concurrent_requests_share_one_wake_and_are_held_until_a_worker_is_up() -> None:
    stack = Stack({"a"})
    assert wake_all(stack, ["a"] * 5) == [True] * 5
    assert stack.wakes == [("a", "Bearer " + "t" * 16)]


def test_a_model_the_supervisor_does_not_serve_is_not_found() -> None:
    stack = Stack({"a"})
    assert wake_all(stack, ["zzz"]) == [False]


def test_a_model_not_up_in_time_is_503_with_retry_after() -> None:
    stack = Stack({"a"}, start_polls=10**9)
    [error] = wake_all(stack, ["a"], timeout=0.2)
    assert isinstance(error, GatewayError) and error.status == 503
    assert error.code == "model_cold_start_timeout"
    assert error.response().headers["retry-after"]


def test_an_unreachable_supervisor_is_503() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    stack = Stack(set())
    stack.handler = down  # type: ignore[method-assign]
    [error] = wake_all(stack, ["a"])
    assert isinstance(error, GatewayError) and error.status == 503
