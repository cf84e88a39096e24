"""The gateway's small parts, each alone: circuit breaker, retry budget, rate limiters (memory
and Redis), concurrency limits, key file, routing view and policy, request parsing, errors and
the SSE relay. No model, no server processes except redis-server."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from servers import RedisServer, free_port, redis_or_skip

from pagedserve.api_gateway import rate_limit
from pagedserve.api_gateway.auth import ApiKey, KeyRing
from pagedserve.api_gateway.circuit_breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    CircuitBreaker,
    CircuitBreakers,
)
from pagedserve.api_gateway.concurrency import ConcurrencyLimiter
from pagedserve.api_gateway.config import GatewayConfig
from pagedserve.api_gateway.errors import GatewayError
from pagedserve.api_gateway.forwarding import Forwarded, Forwarder
from pagedserve.api_gateway.metrics import GatewayMetrics
from pagedserve.api_gateway.rate_limit import InMemoryRateLimiter, KeyRateLimits, RedisRateLimiter
from pagedserve.api_gateway.resumption import StreamResumer, asking_for_token_ids, resumable
from pagedserve.api_gateway.retry_budget import RetryBudget
from pagedserve.api_gateway.routing import InFlight, RoutingTable
from pagedserve.api_gateway.serving import CHAT, COMPLETIONS, GatewayServing
from pagedserve.api_gateway.streaming import DONE, SSERelay
from pagedserve.api_gateway.upstream import Answer, OpenStream
from pagedserve.controller.dispatch import (
    DECODE_TOKEN_COST,
    REQUEST_TOKENS,
    Route,
    RouteRequest,
    make_policy,
)
from pagedserve.protocol.openai import ChatCompletionRequest, CompletionRequest
from pagedserve.protocol.registry import WorkerView


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


# -- circuit breaker ---------------------------------------------------------------------------


def test_breaker_opens_after_threshold_failures_in_a_row_and_success_resets_the_count() -> None:
    clock = Clock()
    b = CircuitBreaker(threshold=3, cooldown=10, clock=clock)
    b.failure(), b.failure()
    b.success()  # the count starts again
    assert not b.failure() and not b.failure()
    assert b.failure() is True  # third in a row opens it
    assert b.state == OPEN and not b.available() and b.retry_in() == 10


def test_breaker_lets_one_trial_through_after_cooldown_and_closes_on_its_success() -> None:
    clock = Clock()
    b = CircuitBreaker(threshold=1, cooldown=5, clock=clock)
    b.failure()
    clock.now += 4.9
    assert not b.available()
    clock.now += 0.2
    assert b.available()
    b.begin()
    assert b.state == HALF_OPEN and not b.available()  # one trial at a time
    b.success()
    assert b.state == CLOSED and b.available()


def test_breaker_reopens_when_the_trial_fails_and_frees_the_trial_when_cancelled() -> None:
    clock = Clock()
    b = CircuitBreaker(threshold=2, cooldown=5, clock=clock)
    b.failure(), b.failure()
    clock.now += 6
    b.begin()
    b.cancel()  # client gone: no verdict, the next request may try
    assert b.state == HALF_OPEN and b.available()
    b.begin()
    assert b.failure() is True  # one failed trial is enough
    assert b.state == OPEN and not b.available()


# -- retry budget ------------------------------------------------------------------------------


def test_retry_budget_allows_a_ratio_of_recent_requests_plus_a_floor() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_second=0.1, window=10, clock=clock)  # floor: 1
    for _ in range(20):
        budget.record_request()
    assert [budget.try_spend() for _ in range(6)] == [True] * 5 + [False]  # 0.2 * 20 + 1
    clock.now += 10.5  # the window has passed: only the floor is left
    assert budget.try_spend() is True and budget.try_spend() is False


def test_retry_budget_with_no_ratio_and_no_floor_never_retries() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.0)
    budget.record_request()
    assert budget.try_spend() is False


def test_a_request_its_worker_dropped_is_retried_whatever_the_budget() -> None:
    """Connection refused (a dead worker still listed) or lost before the first byte (a worker
    killed with the request queued): no work is left behind, so the retry elsewhere spends no
    budget. A 503 is an overloaded worker's answer: with no budget left, it is not retried."""
    ids = ("0", "1", "2", "3")
    workers = {wid: WorkerView.model_validate(_worker(wid, ["m"])) for wid in ids}
    dead, sick, live, killed = (workers[w].worker_name for w in ids)

    def handler(request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.netloc.decode()}"
        if url == dead:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if url == killed:
            raise httpx.ReadError("Connection lost", request=request)
        if url == sick:
            return httpx.Response(503, stream=httpx.ByteStream(b'{"error": "draining"}'))
        return httpx.Response(200, stream=httpx.ByteStream(b'{"ok": true}'))

    class Table:
        def __init__(self, *ids: str) -> None:
            self.ids = ids

        def workers(self, model: str) -> list[WorkerView]:
            return [workers[w] for w in self.ids]

        async def refresh_soon(self) -> None:
            pass

    class InOrder:  # the first worker not tried yet
        def select(self, candidates: list[WorkerView], request: RouteRequest) -> Route | None:
            return Route(candidates[0], "in_order") if candidates else None

    async def forward(*ids: str) -> Forwarded:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            forwarder = Forwarder(
                client, Table(*ids), InOrder(), InFlight(), CircuitBreakers(3, 10),  # type: ignore[arg-type]
                RetryBudget(ratio=0.0, min_per_second=0.0), GatewayMetrics(),
                max_retries=2, first_token_timeout=5,
            )  # fmt: skip
            deadline = time.monotonic() + 5
            return await forwarder.forward(
                RouteRequest("m"), "/v1/completions", b"{}", {}, False, deadline
            )

    for gone in ("0", "3"):
        forwarded = run(forward(gone, "2"))
        assert isinstance(forwarded.outcome, Answer) and forwarded.worker.worker_id == "2"
        assert forwarded.retries == 1
    with pytest.raises(GatewayError) as refused:
        run(forward("1", "2"))
    assert refused.value.status == 503


# -- rate limiters -----------------------------------------------------------------------------


def test_memory_bucket_refuses_past_the_limit_and_says_when_to_come_back() -> None:
    clock = Clock()
    limiter = InMemoryRateLimiter(clock)
    assert run(limiter.take("k:rpm", 2, 1)) == 0 and run(limiter.take("k:rpm", 2, 1)) == 0
    wait = run(limiter.take("k:rpm", 2, 1))
    assert wait == pytest.approx(30.0)  # refills 2 per minute: one every 30 s
    clock.now += 30
    assert run(limiter.take("k:rpm", 2, 1)) == 0
    assert run(limiter.take("other:rpm", 2, 1)) == 0  # buckets are separate


def test_memory_bucket_takes_an_oversized_cost_from_a_full_bucket_into_debt() -> None:
    clock = Clock()
    limiter = InMemoryRateLimiter(clock)
    assert run(limiter.take("k:tpm", 100, 250)) == 0  # a full bucket covers any one request
    wait = run(limiter.take("k:tpm", 100, 1))
    assert wait == pytest.approx((150 + 1) * 60 / 100)  # the debt is paid off first
    run(limiter.charge("k:tpm", 100, -250))  # refunds fill up to the size, no further
    assert run(limiter.take("k:tpm", 100, 100)) == 0


def test_key_limits_refuse_with_429_and_retry_after_and_give_tokens_back() -> None:
    clock = Clock()
    limiter = InMemoryRateLimiter(clock)
    refused: list[str] = []
    limits = KeyRateLimits(limiter, refused.append)
    key = ApiKey(name="alice", rpm=1, tpm=1000)

    async def scenario() -> None:
        first = await limits.admit(key, 100)
        await limits.settle(first, 300)  # 100 charged, 300 used: 200 more
        with pytest.raises(GatewayError) as e:
            await limits.admit(key, 100)
        assert e.value.status == 429 and e.value.type == "requests"
        assert e.value.retry_after == pytest.approx(60)
        assert e.value.response().headers["Retry-After"] == "60"
        # the refused request's prompt tokens went back: 700 are left
        assert await limiter.take("alice:tpm", 1000, 700) == 0

    run(scenario())
    assert refused == ["rpm"]
    assert run(limits.admit(None, 10**9)).key is None  # no key, no limits


def test_key_limits_refuse_tokens_per_minute() -> None:
    limits = KeyRateLimits(InMemoryRateLimiter(Clock()), lambda _: None)
    key = ApiKey(name="bob", tpm=100)

    async def scenario() -> None:
        await limits.settle(await limits.admit(key, 10), 150)  # 50 in debt
        with pytest.raises(GatewayError) as e:
            await limits.admit(key, 10)
        assert e.value.status == 429 and e.value.type == "tokens"
        assert e.value.retry_after == pytest.approx(60 * 60 / 100)

    run(scenario())


class _BrokenLimiter:
    async def take(self, *a: object) -> float:
        raise ConnectionError("redis down")

    async def charge(self, *a: object) -> None:
        raise ConnectionError("redis down")

    async def close(self) -> None:
        pass


def test_key_limits_let_requests_through_when_the_store_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refused: list[str] = []
    limits = KeyRateLimits(_BrokenLimiter(), refused.append)
    key = ApiKey(name="x", rpm=1, tpm=1)

    async def scenario() -> None:
        for _ in range(3):  # far past 1 request and 1 token a minute: nothing counts, all pass
            admission = await limits.admit(key, 5)
            assert admission.key is key and admission.tokens_charged == 5
            await limits.settle(admission, 50)  # logged, not raised
            assert admission.tokens_charged == 5  # the store never took the other 45

    with caplog.at_level(logging.WARNING, logger=rate_limit.__name__):
        run(scenario())
    assert refused == []
    said = [r.getMessage() for r in caplog.records if r.name == rate_limit.__name__]
    assert sum("letting the request through" in m for m in said) == 6  # tpm and rpm, 3 times
    assert sum("token use of x not recorded" in m for m in said) == 3


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_or_skip(tmp_path_factory.mktemp("redis")) as server:
        yield server


def test_redis_buckets_are_shared_between_limiters_and_expire(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        prefix = f"test{free_port()}"
        a, b = (
            RedisRateLimiter(redis_server.url, prefix),
            RedisRateLimiter(redis_server.url, prefix),
        )
        try:
            await a.ping()
            assert await a.take("k:rpm", 3, 1) == 0
            assert await b.take("k:rpm", 3, 1) == 0
            assert await a.take("k:rpm", 3, 1) == 0
            wait = await b.take("k:rpm", 3, 1)  # the fourth, whichever gateway asks
            assert 19 < wait <= 20.1
            await b.charge("k:rpm", 3, -1)
            assert await a.take("k:rpm", 3, 1) == 0
            import redis.asyncio as redis

            client = redis.from_url(redis_server.url)
            ttl = await client.pttl(f"{prefix}:bucket:k:rpm")
            await client.aclose()
            assert 60_000 < ttl <= 121_000
        finally:
            await a.close()
            await b.close()

    run(scenario())


# -- concurrency -------------------------------------------------------------------------------


def test_concurrency_limits_in_total_and_per_key_refuse_at_once_and_free_on_release() -> None:
    limiter = ConcurrencyLimiter(max_total=3)
    key = ApiKey(name="k", max_concurrent=1)
    slot = limiter.acquire(key)
    with pytest.raises(GatewayError) as e:
        limiter.acquire(key)
    assert e.value.status == 429 and e.value.code == "concurrency_limit_exceeded"
    others = [limiter.acquire(None), limiter.acquire(ApiKey(name="other"))]
    with pytest.raises(GatewayError) as e:
        limiter.acquire(None)
    assert e.value.status == 503 and e.value.retry_after == 1
    slot.release()
    slot.release()  # idempotent
    assert limiter.total == 2
    limiter.acquire(key).release()
    for s in others:
        s.release()
    assert limiter.total == 0


# -- keys --------------------------------------------------------------------------------------


def test_key_file_loads_keys_and_authenticates_bearer_headers(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    path.write_text(
        "# the team\n\n"
        '{"key": "sk-alice-1", "name": "alice", "models": ["tiny"], "rpm": 5, "tpm": 100}\n'
        '{"key": "sk-ops-2", "max_concurrent": 2}\n'
    )
    ring = KeyRing.load(path)
    alice = ring.authenticate("Bearer sk-alice-1")
    assert alice.name == "alice" and alice.rpm == 5 and alice.tpm == 100
    assert alice.allows("tiny") and not alice.allows("other")
    ops = ring.authenticate("bearer  sk-ops-2")
    assert ops.name.startswith("key-") and ops.allows("anything") and ops.max_concurrent == 2
    for header, code in [(None, "missing_api_key"), ("Bearer nope", "invalid_api_key"),
                         ("Basic sk-alice-1", "invalid_api_key")]:  # fmt: skip
        with pytest.raises(GatewayError) as e:
            ring.authenticate(header)
        assert e.value.status == 401 and e.value.code == code


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("not json", "not JSON"),
        ('["a"]', "JSON object"),
        ('{"name": "x"}', "key must be"),
        ('{"key": "k", "rmp": 5}', "unknown fields"),
        ('{"key": "k", "rpm": 0}', "rpm must be a positive integer"),
        ('{"key": "k", "tpm": "lots"}', "tpm must be a positive integer"),
        ('{"key": "k", "models": "tiny"}', "models must be a list"),
        ('{"key": "k"}\n{"key": "k"}', "already listed"),
        ('{"key": "a", "name": "n"}\n{"key": "b", "name": "n"}', "already used"),
        ("# only a comment", "lists no keys"),
    ],
)
def test_bad_key_files_are_refused_with_the_line_at_fault(
    tmp_path: Path, line: str, says: str
) -> None:
    path = tmp_path / "keys.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=says):
        KeyRing.load(path)


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("controller_address", "localhost:21001"),
        ("port", 0),
        ("redis_url", "localhost:6379"),
        ("max_concurrent_requests", 0),
        ("max_n", 17),
        ("max_tokens_limit", 0),
        ("total_timeout", 0),
        ("max_retries", -1),
        ("retry_budget_ratio", 1.5),
    ],
)
def test_config_refuses_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        GatewayConfig(**{field: value})


# -- routing -----------------------------------------------------------------------------------


def _worker(wid: str, models: list[str], **fields: object) -> dict:
    return {"worker_name": f"http://127.0.0.1:1{wid}", "worker_id": wid, "model_names": models,
            "registered_at": 100.0, **fields}  # fmt: skip


def test_routing_view_keeps_ready_pagedserve_workers_and_survives_a_controller_outage() -> None:
    view = {
        "workers": [
            _worker("1", ["a", "b"], context_length=256),
            _worker("2", ["a"], context_length=128),
            _worker("3", ["a"], state="draining"),
            _worker("4", ["a"], ready=False),
            _worker("5", ["c"], kind="fastchat"),
        ]
    }
    calls = {"n": 0, "down": False}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["down"]:
            return httpx.Response(503)
        assert request.url.path == "/workers"
        return httpx.Response(200, json=view)

    async def scenario() -> None:
        changed: list[set[str]] = []
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            table = RoutingTable(client, "http://ctl", refresh_interval=60, timeout=1)
            table.on_change = changed.append
            await table.refresh()
            assert [w.worker_id for w in table.workers("a")] == ["1", "2"]
            assert table.model_names() == ["a", "b"]
            cards = {c.id: c for c in table.models()}
            assert cards["a"].max_model_len == 128 and cards["a"].owned_by == "pagedserve"
            await table.refresh()  # unchanged: no change reported
            assert changed == [{"1", "2"}]
            calls["down"] = True
            await table.refresh()
            assert not table.controller_ok and table.model_names() == ["a", "b"]
            # at most one refresh in min_refresh_gap, however many requests ask at once
            before = calls["n"]
            await asyncio.gather(*(table.refresh_soon() for _ in range(5)))
            assert calls["n"] == before

    run(scenario())


def test_least_load_over_in_flight_prefers_idle_workers_and_rotates_ties() -> None:
    workers = [WorkerView.model_validate(_worker(w, ["m"])) for w in "12"]
    in_flight = InFlight()
    policy = make_policy("least_load", load=in_flight.load)

    def pick() -> str:
        return policy.select(workers, RouteRequest("m")).worker.worker_id

    assert sorted(pick() for _ in range(4)) == ["1", "1", "2", "2"]  # ties alternate
    ticket = in_flight.begin("1", 0, 16)
    assert {pick() for _ in range(3)} == {"2"}
    in_flight.end(ticket)
    in_flight.end(ticket)  # idempotent
    assert in_flight.outstanding == {}
    workers[1].waiting = 2  # the worker's own report counts too
    assert {pick() for _ in range(3)} == {"1"}
    workers[1].waiting = 0


def test_work_still_to_prefill_and_decode_weighs_on_a_worker_until_done() -> None:
    """Two requests decoding on worker 1, one long prompt just sent to worker 2: the next
    request goes to 1, where its prefill does not wait behind another."""
    workers = [WorkerView.model_validate(_worker(w, ["m"])) for w in "12"]
    in_flight = InFlight()
    policy = make_policy("least_load", load=in_flight.load)
    decode = 16 * DECODE_TOKEN_COST  # 16 tokens to generate, in prompt tokens of work
    decoding = [in_flight.begin("1", 300, 16) for _ in range(2)]
    for t in decoding:
        in_flight.first_token(t)
    prefilling = in_flight.begin("2", 3 * REQUEST_TOKENS, 16)
    assert in_flight.load(workers[0]) == 2 * decode / REQUEST_TOKENS
    assert in_flight.load(workers[1]) == 3 + decode / REQUEST_TOKENS
    assert policy.select(workers, RouteRequest("m")).worker.worker_id == "1"
    in_flight.first_token(prefilling)  # its prefill is over: now 2 has the lighter load
    assert policy.select(workers, RouteRequest("m")).worker.worker_id == "2"
    for t in (*decoding, prefilling):
        in_flight.end(t)
    assert in_flight.outstanding == {} and in_flight.work == {}


# -- parsing and limits of requests ------------------------------------------------------------


def _serving(**config: object) -> GatewayServing:
    return GatewayServing(GatewayConfig(**config), None, None, None, None, None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (b"{", None, "could not parse the JSON"),
        (b"[]", None, "must be a JSON object"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "1"}',
         "temperature", "valid number"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
         "stream", "valid boolean"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}',
         "max_tokens", "valid integer"),
        (b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}',
         "messages[0].role", "Input should be"),
        (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}',
         "messages[0].content", "valid string"),
    ],
)  # fmt: skip
def test_bodies_with_bad_json_or_wrong_types_get_a_400_naming_the_field(
    body: bytes, param: str | None, says: str
) -> None:
    with pytest.raises(GatewayError) as e:
        _serving()._validate(CHAT, body)
    assert e.value.status == 400 and e.value.param == param and says in e.value.message


def test_unknown_fields_are_ignored_and_the_body_is_forwarded_untouched() -> None:
    body = b'{"model": "m", "prompt": "x", "brand_new_openai_field": {"a": 1}, "logprobs": 2}'
    req, forwarded = _serving()._validate(COMPLETIONS, body)
    assert isinstance(req, CompletionRequest) and forwarded is body


def test_gateway_limits_on_n_and_max_tokens_and_a_bound_for_open_ended_chats() -> None:
    serving = _serving(max_n=2, max_tokens_limit=32)
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for extra, param in [({"n": 3}, "n"), ({"max_tokens": 33}, "max_tokens"),
                         ({"max_completion_tokens": 40}, "max_completion_tokens")]:  # fmt: skip
        with pytest.raises(GatewayError) as e:
            serving._validate(CHAT, json.dumps({**chat, **extra}).encode())
        assert e.value.status == 400 and e.value.param == param
    req, body = serving._validate(CHAT, json.dumps(chat).encode())
    assert isinstance(req, ChatCompletionRequest) and json.loads(body)["max_tokens"] == 32
    raw = json.dumps({**chat, "max_tokens": 5}).encode()
    assert serving._validate(CHAT, raw)[1] is raw


def test_prompt_tokens_are_counted_for_ids_and_estimated_for_text() -> None:
    serving = _serving()
    worker = WorkerView.model_validate(_worker("1", ["m"]))
    ids = CompletionRequest(model="m", prompt=[[1, 2, 3], [4]])
    text = CompletionRequest(model="m", prompt="x" * 40)
    assert run(serving._prompt_tokens(COMPLETIONS, ids, worker)) == 4
    assert run(serving._prompt_tokens(COMPLETIONS, text, worker)) == 10
    limited = _serving(max_prompt_tokens=2)
    with pytest.raises(GatewayError) as e:
        run(limited._prompt_tokens(COMPLETIONS, ids, worker))
    assert e.value.status == 400 and e.value.code == "prompt_too_long"


# -- the SSE relay -----------------------------------------------------------------------------


class _FakeResponse:
    async def aclose(self) -> None:
        pass


def _relay(parts: list[bytes | Exception], deadline: float = float("inf")) -> SSERelay:
    async def chunks() -> AsyncIterator[bytes]:
        for p in parts[1:]:
            if isinstance(p, Exception):
                raise p
            yield p

    first = parts[0]
    assert isinstance(first, bytes)
    return SSERelay(OpenStream(_FakeResponse(), chunks(), first), deadline)  # type: ignore[arg-type]


async def _drain(relay: SSERelay) -> bytes:
    return b"".join([b async for b in relay])


def test_relay_passes_events_through_whole_and_reads_the_usage_chunk() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    stream = [b'data: {"a": 1}\n\ndata: {"b"', b': 2}\n\n', f'data: {{"choices": [], "usage": {json.dumps(usage)}}}\n\n'.encode().replace(b'"usage": ', b'"usage":'), DONE]  # fmt: skip
    relay = _relay(list(stream))
    assert run(_drain(relay)) == b"".join(stream)
    assert relay.done and relay.error is None and relay.usage == usage and relay.events == 4


def test_relay_ends_a_broken_stream_with_an_error_event_and_done() -> None:
    relay = _relay([b'data: {"a": 1}\n\ndata: {"half', httpx.RemoteProtocolError("peer closed")])
    out = run(_drain(relay)).decode()
    events = [e for e in out.split("\n\n") if e]
    assert events[0] == 'data: {"a": 1}'  # the half event is never sent
    assert json.loads(events[1][6:])["error"]["code"] == "upstream_error"
    assert events[2] == "data: [DONE]" and "peer closed" in relay.error


def test_relay_ends_at_the_total_deadline() -> None:
    async def scenario() -> bytes:
        async def slow() -> AsyncIterator[bytes]:
            await asyncio.sleep(10)
            yield b""

        relay = SSERelay(
            OpenStream(_FakeResponse(), slow(), b"data: {}\n\n"), time.monotonic() + 0.05
        )  # type: ignore[arg-type]
        out = await asyncio.wait_for(_drain(relay), 5)
        assert relay.error == "timeout"
        return out

    out = run(scenario())
    assert b'"code":"timeout"' in out and out.endswith(DONE)


def test_several_gateway_processes_need_redis_for_key_rates_and_no_key_concurrency(
    tmp_path: Path,
) -> None:
    from pagedserve.api_gateway.server import check_workers

    keys = tmp_path / "keys.jsonl"
    keys.write_text('{"key": "sk-a-0123456789", "name": "a", "rpm": 10}\n')
    check_workers(GatewayConfig(api_keys_file=str(keys)), 1)
    with pytest.raises(ValueError, match="--redis-url"):
        check_workers(GatewayConfig(api_keys_file=str(keys)), 2)
    check_workers(GatewayConfig(api_keys_file=str(keys), redis_url="redis://127.0.0.1:1/0"), 2)
    keys.write_text('{"key": "sk-a-0123456789", "name": "a", "max_concurrent": 2}\n')
    with pytest.raises(ValueError, match="max_concurrent"):
        check_workers(GatewayConfig(api_keys_file=str(keys), redis_url="redis://h:1/0"), 2)
    check_workers(GatewayConfig(), 4)  # no keys: nothing to share


def test_transport_keeps_connections_alive_frames_bodies_and_drops_an_unfinished_one() -> None:
    from pagedserve.api_gateway.http_pool import make_client

    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345",  # left before its end
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
    ]
    connections: list[int] = []
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                seen.append(await reader.readexactly(length))
                writer.write(answers.pop(0))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/x"
        client = make_client(1.0, max_keepalive=4)
        try:
            first = await client.send_direct(httpx.URL(url), b"a", {})
            assert (first.status_code, await first.aread()) == (200, b"hello")
            second = await client.send_direct(httpx.URL(url), b"bb", {})
            assert [c async for c in second.aiter_raw()] == [b"abc", b"de"]
            assert len(connections) == 1  # kept alive
            third = await client.send_direct(httpx.URL(url), b"c", {})
            assert await third.aiter_raw().__anext__() == b"12345"
            await third.aclose()  # unfinished: this connection is dropped
            fourth = await client.post(url, content=b"dd")  # httpx's own path, same transport
            assert (fourth.status_code, fourth.content) == (404, b"no")
            assert len(connections) == 2 and seen == [b"a", b"bb", b"c", b"dd"]
            with pytest.raises(httpx.ConnectError):
                await client.send_direct(httpx.URL(f"http://127.0.0.1:{free_port()}/"), b"", {})
        finally:
            await client.aclose()
            server.close()

    asyncio.run(scenario())


# -- resuming a broken stream ------------------------------------------------------------------


def _chunk(content: str | None, ids: list[int] | None, finish_reason: str | None = None) -> bytes:
    choice: dict[str, object] = {"index": 0, "delta": {"content": content}}
    if ids is not None:
        choice["token_ids"] = ids
    choice["finish_reason"] = finish_reason
    return b"data: " + json.dumps({"id": "chatcmpl-r", "choices": [choice]}).encode()


class _FakeForwarder:
    """Hands out one resumed stream; records what it was asked."""

    def __init__(self, resumed: list[bytes] | None) -> None:
        self.resumed = resumed
        self.calls: list[tuple[dict, set[str]]] = []
        self.failed: list[str] = []
        self.done_with: list[str] = []

    async def forward(self, request, path, body, headers, stream, deadline, exclude=frozenset()):
        self.calls.append((json.loads(body), set(exclude)))
        if self.resumed is None:
            raise GatewayError(503, "no worker", code="no_worker_available")
        worker = WorkerView.model_validate(_worker("w2", ["m"]))
        chunks = _relay(self.resumed).stream
        return Forwarded(Route(worker, "least_load"), chunks, 0)

    async def stream_failed(self, worker, reason: str) -> None:
        self.failed.append(worker.worker_id)

    def done(self, forwarded) -> None:
        self.done_with.append(forwarded.worker.worker_id)


def _resumer(forwarder: _FakeForwarder, body: dict, wants_ids: bool = False) -> StreamResumer:
    first = Forwarded(Route(WorkerView.model_validate(_worker("w1", ["m"])), "least_load"), None, 0)
    return StreamResumer(
        forwarder,  # type: ignore[arg-type]
        RouteRequest("m"),
        "/v1/chat/completions",
        json.dumps(body).encode(),
        {},
        float("inf"),
        wants_ids,
        first,  # type: ignore[arg-type]
    )


def test_a_broken_stream_goes_on_on_another_worker_from_the_tokens_sent() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    first = [
        b"data: "
        + json.dumps(
            {"choices": [{"index": 0, "delta": {"role": "assistant"}}], "prompt_token_ids": [1, 2]}
        ).encode()
        + b"\n\n"
        + _chunk("Hel", [5, 6])
        + b"\n\n",
        _chunk("lo é", [7]) + b"\n\n" + _chunk("half", [8])[:20],  # a half event, then gone
        httpx.RemoteProtocolError("peer closed"),
    ]
    resumed = [_chunk(" world", [9, 10]) + b"\n\n", _chunk(None, [], finish_reason="stop") + b"\n\n" + DONE]  # fmt: skip
    forwarder = _FakeForwarder(resumed)
    relay = _relay(first)
    relay.resumer = _resumer(forwarder, body)
    out = run(_drain(relay)).decode()
    events = [json.loads(e[6:]) for e in out.split("\n\n") if e.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == "Hello é world" and out.endswith("data: [DONE]\n\n")
    assert relay.done and relay.error is None
    # the client did not ask for ids: none reach it
    assert not any("token_ids" in e or "token_ids" in e["choices"][0] for e in events)
    sent, exclude = forwarder.calls[0]
    assert sent["resume"] == {"output_token_ids": [5, 6, 7], "sent_chars": len("Hello é")}
    assert sent["return_token_ids"] is True and sent["messages"] == body["messages"]
    assert exclude == {"w1"} and forwarder.failed == ["w1"] and forwarder.done_with == ["w1"]
    assert relay.resumer.current.worker.worker_id == "w2" and relay.resumer.resumes == 1


def test_ids_stay_when_asked_and_no_resumption_without_them_or_without_a_worker() -> None:
    asked = _resumer(_FakeForwarder(None), {"model": "m"}, wants_ids=True)
    block = _chunk("a", [3]) + b"\n\n"
    assert asked.observe(block) == block and asked.token_ids == [3]
    # a worker that never said which tokens it sent (a stub, FastChat's) is not resumed from
    for parts, forwarder in (
        ([_chunk("a", None) + b"\n\n", httpx.ReadError("gone")], _FakeForwarder([DONE])),
        ([_chunk("a", [1]) + b"\n\n", httpx.ReadError("gone")], _FakeForwarder(None)),
    ):
        relay = _relay(parts)
        relay.resumer = _resumer(forwarder, {"model": "m"})
        out = run(_drain(relay))
        assert b'"code":"upstream_error"' in out and out.endswith(DONE) and "gone" in relay.error
        assert relay.resumer.resumes == 0


def test_only_single_choice_streams_are_resumable_and_ids_are_asked_for_in_place() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert resumable(ChatCompletionRequest.model_validate(chat))
    assert not resumable(ChatCompletionRequest.model_validate({**chat, "n": 2}))
    assert not resumable(ChatCompletionRequest.model_validate({**chat, "stream": False}))
    done = {"model": "m", "prompt": "hi", "stream": True}
    assert resumable(CompletionRequest.model_validate(done))
    assert not resumable(CompletionRequest.model_validate({**done, "best_of": 2}))
    assert not resumable(CompletionRequest.model_validate({**done, "prompt": ["a", "b"]}))
    assert not resumable(CompletionRequest.model_validate({**done, "echo": True}))
    raw = b'{"model": "m", "return_token_ids": false, "prompt": "hi"}\n'
    assert json.loads(asking_for_token_ids(raw)) == {
        "model": "m",
        "return_token_ids": True,
        "prompt": "hi",
    }


def test_a_worker_lost_after_the_answers_end_only_misses_its_done() -> None:
    parts = [
        _chunk("all", [1]) + b"\n\n" + _chunk(None, [], finish_reason="stop") + b"\n\n",
        httpx.ReadError("gone"),
    ]
    forwarder = _FakeForwarder([DONE])
    relay = _relay(parts)
    relay.resumer = _resumer(forwarder, {"model": "m"})
    out = run(_drain(relay))
    assert out.endswith(b"\n\n" + DONE) and b"error" not in out
    assert relay.done and relay.error is None and forwarder.calls == []


def test_a_worker_lost_right_after_the_last_token_of_max_tokens_gets_its_finish_chunk() -> None:
    parts = [_chunk("a", [1]) + b"\n\n" + _chunk("b", [2]) + b"\n\n", httpx.ReadError("gone")]
    relay = _relay(parts)
    relay.resumer = _resumer(_FakeForwarder([DONE]), {"model": "m"})
    relay.resumer.request = RouteRequest("m", max_tokens=2)
    events = run(_drain(relay)).split(b"\n\n")
    assert json.loads(events[-3][6:])["choices"] == [
        {"index": 0, "finish_reason": "length", "delta": {}}
    ]
    assert events[-2:] == [b"data: [DONE]", b""] and relay.error is None
    assert relay.resumer.resumes == 0 and json.loads(events[-3][6:])["id"] == "chatcmpl-r"
