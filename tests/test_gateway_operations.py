"""The gateway's operations against stub workers (real processes that answer OpenAI's routes
instantly and fail on demand): API keys, per-key limits in memory and in Redis across two
gateways, concurrency limits, request ids, fail-over on 5xx and timeouts, the circuit breaker,
and failures after the first byte."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from servers import (
    RedisServer,
    ServerProcess,
    cli,
    controller_process,
    gateway_process,
    metric,
    redis_or_skip,
    start_all,
    stub_worker_process,
    wait_until,
)

KEYS = {
    "alice": {"key": "sk-alice-0001", "name": "alice", "models": ["stub"], "rpm": 2},
    "bob": {"key": "sk-bob-0002", "name": "bob", "tpm": 40},
    "carol": {"key": "sk-carol-0003", "name": "carol", "max_concurrent": 1},
    "eve": {"key": "sk-eve-0004", "name": "eve"},
    "frank": {"key": "sk-frank-0005", "name": "frank", "rpm": 3},
}
CHAT = {"model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "stub", "prompt": "hi", "max_tokens": 4}
FAULTS_OFF = {"openai_status": 200, "first_byte_delay": 0.0, "break_after": None}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]['key']}"}


@dataclass
class Cluster:
    controller: ServerProcess
    stubs: list[ServerProcess]
    log_dir: Path
    key_file: Path
    gateways: list[ServerProcess]

    def gateway(self, **options: object) -> ServerProcess:
        """A new gateway in front of the stubs, ready once it routes to both of them."""
        g = gateway_process(
            self.log_dir, self.controller.url, routing_refresh_interval=0.5, **options
        )
        self.gateways.append(g)
        g.start(timeout=30)
        headers = auth("eve") if "api_keys" in options else {}
        wait_until(
            lambda: (
                {m["id"] for m in httpx.get(g.url + "/v1/models", headers=headers).json()["data"]}
                == {"stub", "stub-b"}
            ),
            10,
            what="gateway routes to the stubs",
        )
        return g

    def gateways_side_by_side(self, count: int, **options: object) -> list[ServerProcess]:
        """`count` gateways with the same options, started at once."""
        gateways = [
            gateway_process(
                self.log_dir, self.controller.url, routing_refresh_interval=0.5, **options
            )
            for _ in range(count)
        ]
        self.gateways.extend(gateways)
        start_all(*gateways, timeout=30)
        return gateways

    def control(self, stub: ServerProcess, **state: object) -> dict:
        return httpx.post(stub.url + "/_control", json=state, timeout=5).json()

    def served(self) -> list[int]:
        return [self.control(s)["openai_requests"] for s in self.stubs]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("gateway-ops")
    key_file = log_dir / "keys.jsonl"
    key_file.write_text("\n".join(json.dumps(k) for k in KEYS.values()) + "\n")
    with controller_process(log_dir, health_check_interval=1).start() as ctl:
        stubs = [
            stub_worker_process(
                log_dir, ctl.url, model_names="stub,stub-b", reply="one two three four"
            )
            for _ in range(2)
        ]
        cluster = Cluster(ctl, stubs, log_dir, key_file, [])
        try:
            start_all(*stubs)
            yield cluster
        finally:
            for p in (*cluster.gateways, *stubs):
                p.stop()


@pytest.fixture(autouse=True)
def no_faults(cluster: Cluster) -> Iterator[None]:
    yield
    for s in cluster.stubs:
        cluster.control(s, **FAULTS_OFF)


@pytest.fixture(scope="module")
def keyed(cluster: Cluster) -> ServerProcess:
    return cluster.gateway(api_keys=cluster.key_file)


@pytest.fixture(scope="module")
def faults(cluster: Cluster) -> ServerProcess:
    """No keys, no circuit breaking (so that tests do not disturb each other), short timeouts."""
    return cluster.gateway(breaker_threshold=1000, first_token_timeout=0.5, total_timeout=1.5)


def in_background(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(call()), daemon=True)
    t.start()
    return t, out


# -- keys --------------------------------------------------------------------------------------


def test_every_route_but_health_needs_a_valid_key(keyed: ServerProcess) -> None:
    assert httpx.get(keyed.url + "/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions"), ("GET", "/metrics"),
                         ("GET", "/openapi.json")]:  # fmt: skip
        r = httpx.request(method, keyed.url + path, json=CHAT)
        assert r.status_code == 401, path
        error = r.json()["error"]
        assert error["code"] == "missing_api_key" and "Authorization" in error["message"]
        r = httpx.request(
            method, keyed.url + path, json=CHAT, headers={"Authorization": "Bearer x"}
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    ok = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEYS["eve"]["key"], max_retries=0)
    assert ok.chat.completions.create(**CHAT).choices[0].message.content == "one two three four"


def test_a_key_sees_and_uses_only_its_models(keyed: ServerProcess) -> None:
    models = httpx.get(keyed.url + "/v1/models", headers=auth("alice")).json()["data"]
    assert [m["id"] for m in models] == ["stub"]
    r = httpx.post(
        keyed.url + "/v1/chat/completions", json={**CHAT, "model": "stub-b"}, headers=auth("eve")
    )
    assert r.status_code == 200
    r = httpx.get(keyed.url + "/v1/models/stub-b", headers=auth("alice"))
    assert r.status_code == 404
    r = httpx.post(
        keyed.url + "/v1/chat/completions", json={**CHAT, "model": "stub-b"}, headers=auth("alice")
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# -- per-key limits ----------------------------------------------------------------------------


def test_requests_per_minute_get_429_with_retry_after(keyed: ServerProcess) -> None:
    url = keyed.url + "/v1/chat/completions"
    refusals = metric(keyed.url, "pagedserve_gateway_rate_limited_total", auth("eve"), limit="rpm")
    assert [httpx.post(url, json=CHAT, headers=auth("alice")).status_code for _ in range(2)] == [
        200,
        200,
    ]
    r = httpx.post(url, json=CHAT, headers=auth("alice"))
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 30
    assert r.json()["error"]["type"] == "requests"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEYS["alice"]["key"], max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**CHAT)
    assert httpx.post(url, json=CHAT, headers=auth("eve")).status_code == 200  # others unaffected
    after = metric(keyed.url, "pagedserve_gateway_rate_limited_total", auth("eve"), limit="rpm")
    assert after == refusals + 2


def test_tokens_per_minute_get_429_once_the_key_has_used_them(keyed: ServerProcess) -> None:
    url = keyed.url + "/v1/completions"
    long_prompt = {"model": "stub", "prompt": "word " * 80, "stream": True}  # ~100 tokens
    r = httpx.post(url, json=long_prompt, headers=auth("bob"))  # a full bucket covers one
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    r = httpx.post(url, json={"model": "stub", "prompt": "hi"}, headers=auth("bob"))
    assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
    assert int(r.headers["Retry-After"]) > 60  # the debt takes more than a minute to repay


def test_concurrent_requests_beyond_a_keys_limit_get_429_at_once(
    cluster: Cluster, keyed: ServerProcess
) -> None:
    for s in cluster.stubs:
        cluster.control(s, first_byte_delay=1.5)
    url = keyed.url + "/v1/chat/completions"
    slow, out = in_background(lambda: httpx.post(url, json=CHAT, headers=auth("carol"), timeout=30))
    wait_until(
        lambda: metric(keyed.url, "pagedserve_gateway_requests_in_flight", auth("eve")) == 1,
        5,
        what="first request in flight",
    )
    start = time.monotonic()
    r = httpx.post(url, json=CHAT, headers=auth("carol"), timeout=30)
    assert r.status_code == 429 and time.monotonic() - start < 1.0
    assert r.json()["error"]["code"] == "concurrency_limit_exceeded" and r.headers["Retry-After"]
    slow.join(10)
    assert out[0].status_code == 200  # type: ignore[attr-defined]


def test_requests_beyond_max_concurrent_requests_get_503_at_once(cluster: Cluster) -> None:
    gateway = cluster.gateway(max_concurrent_requests=1, public_metrics=True)
    for s in cluster.stubs:
        cluster.control(s, first_byte_delay=1.5)
    url = gateway.url + "/v1/chat/completions"
    slow, out = in_background(lambda: httpx.post(url, json=CHAT, timeout=30))
    wait_until(
        lambda: metric(gateway.url, "pagedserve_gateway_requests_in_flight") == 1,
        5,
        what="first request in flight",
    )
    start = time.monotonic()
    r = httpx.post(url, json=CHAT, timeout=30)
    assert r.status_code == 503 and time.monotonic() - start < 1.0
    assert r.json()["error"]["code"] == "overloaded" and r.headers["Retry-After"] == "1"
    slow.join(10)
    assert out[0].status_code == 200  # type: ignore[attr-defined]
    assert (
        metric(gateway.url, "pagedserve_gateway_rate_limited_total", limit="total_concurrency") == 1
    )


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_or_skip(tmp_path_factory.mktemp("redis")) as server:
        yield server


def test_limits_in_redis_are_shared_by_two_gateways(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    options = {"api_keys": cluster.key_file, "redis_url": redis_server.url, "redis_prefix": "gw"}
    one, two = cluster.gateways_side_by_side(2, **options)
    codes = [
        httpx.post(g.url + "/v1/chat/completions", json=CHAT, headers=auth("frank")).status_code
        for g in (one, two, one, two, one)
    ]
    assert codes == [200, 200, 200, 429, 429]  # rpm 3, whichever gateway is asked


def test_gateway_processes_on_one_port_share_the_keys_limits_through_redis(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    # without carol's max_concurrent, which one process could not count for both
    keys = cluster.log_dir / "keys-2.jsonl"
    keys.write_text("\n".join(json.dumps(KEYS[n]) for n in ("eve", "frank")) + "\n")
    g = cluster.gateway(workers=2, api_keys=keys, redis_url=redis_server.url, redis_prefix="gw2")
    codes = [
        httpx.post(g.url + "/v1/chat/completions", json=CHAT, headers=auth("frank")).status_code
        for _ in range(5)  # new connections: the kernel hands them to either process
    ]
    assert codes == [200, 200, 200, 429, 429]
    pids = {httpx.get(g.url + "/health").json()["pid"] for _ in range(16)}
    assert len(pids) == 2, pids  # both processes serve


# -- request ids -------------------------------------------------------------------------------


def test_the_request_id_reaches_the_worker_and_comes_back(
    cluster: Cluster, keyed: ServerProcess
) -> None:
    r = httpx.post(
        keyed.url + "/v1/chat/completions",
        json=CHAT,
        headers={**auth("eve"), "X-Request-Id": "trace-7"},
    )
    assert r.headers["x-request-id"] == "trace-7"
    assert "trace-7" in [cluster.control(s)["last_request_id"] for s in cluster.stubs]


# -- routing -------------------------------------------------------------------------------------

SYSTEM = "You are a terse assistant. Answer in one short sentence, no more. " * 10


def route_of(response: httpx.Response) -> dict[str, str]:
    """The x-pagedserve-route header as a dict (policy, worker, cached_tokens)."""
    return dict(part.split("=", 1) for part in response.headers["x-pagedserve-route"].split("; "))


def test_prefix_aware_routing_follows_the_shared_prefix_and_says_so(cluster: Cluster) -> None:
    g = cluster.gateway(routing_policy="prefix_aware")
    routes = []
    for question in ("What is two plus two?", "Name a colour.", "Is water wet?"):
        body = {
            "model": "stub",
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question},
            ],
        }
        r = httpx.post(g.url + "/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 200
        routes.append(route_of(r))
    assert [r["policy"] for r in routes] == ["prefix_aware"] * 3
    assert routes[0]["cached_tokens"] == "0"
    assert {r["worker"] for r in routes} == {routes[0]["worker"]}  # all on the prefix's worker
    assert all(int(r["cached_tokens"]) >= len(SYSTEM) // 4 - 16 for r in routes[1:])
    assert metric(g.url, "pagedserve_gateway_prefix_routes_total", result="hit") == 2
    assert metric(g.url, "pagedserve_gateway_prefix_routes_total", result="miss") == 1


def test_a_session_stays_on_its_worker_and_other_traffic_still_spreads(cluster: Cluster) -> None:
    g = cluster.gateway()  # least_load
    session = {"x-session-id": "conversation-42"}
    workers = set()
    for _ in range(4):
        r = httpx.post(g.url + "/v1/completions", json=COMPLETION, headers=session, timeout=10)
        assert r.status_code == 200 and route_of(r)["policy"] == "least_load"
        workers.add(route_of(r)["worker"])
    assert len(workers) == 1
    others = {
        route_of(httpx.post(g.url + "/v1/completions", json=COMPLETION, timeout=10))["worker"]
        for _ in range(4)
    }
    assert len(others) == 2  # without a session, idle workers take turns


def test_the_controller_routes_fastchat_traffic_with_the_same_policies(
    cluster: Cluster,
) -> None:
    url = cluster.controller.url + "/get_worker_address"
    body = {"model": "stub", "prompt": SYSTEM + "first question", "session_id": "chat-1"}
    first = httpx.post(url, json=body, timeout=5)
    again = httpx.post(url, json={**body, "prompt": SYSTEM + "second"}, timeout=5)
    assert first.json()["address"] and route_of(first)["policy"] == "least_load"
    assert again.json()["address"] == first.json()["address"]  # the session sticks
    assert int(route_of(again)["cached_tokens"]) > 0  # every policy tracks prefixes
    plain = httpx.post(url, json={"model": "stub"}, timeout=5)  # FastChat's own body
    assert plain.json()["address"] in {s.url for s in cluster.stubs}


def test_an_unknown_routing_policy_is_refused_at_start(cluster: Cluster) -> None:
    for command in ("gateway", "controller"):
        done = subprocess.run(
            [*cli(command), "--routing-policy", "fastest", "--port", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert "unknown routing policy 'fastest'" in done.stderr


# -- fail-over -----------------------------------------------------------------------------------


def test_a_5xx_is_retried_on_another_worker_and_a_4xx_is_not(
    cluster: Cluster, faults: ServerProcess
) -> None:
    gateway = faults
    url = gateway.url + "/v1/chat/completions"
    cluster.control(cluster.stubs[0], openai_status=500)
    before = cluster.served()
    for _ in range(6):
        assert httpx.post(url, json=CHAT).status_code == 200
    assert metric(gateway.url, "pagedserve_gateway_retries_total", reason="status") >= 1
    for s in cluster.stubs:
        cluster.control(s, openai_status=400)
    before = cluster.served()
    r = httpx.post(url, json=CHAT)
    assert r.status_code == 400 and r.json()["error"]["message"] == "stub fault"
    assert sum(cluster.served()) == sum(before) + 1  # asked once, answer passed on as is


def test_when_every_worker_fails_the_client_gets_502_or_503(
    cluster: Cluster, faults: ServerProcess
) -> None:
    gateway = faults
    url = gateway.url + "/v1/chat/completions"
    for s in cluster.stubs:
        cluster.control(s, openai_status=500)
    r = httpx.post(url, json=CHAT)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    for s in cluster.stubs:
        cluster.control(s, openai_status=503)
    r = httpx.post(url, json=CHAT)
    assert r.status_code == 503 and r.headers["Retry-After"]


def test_the_circuit_breaker_skips_a_failing_worker_and_tries_it_again_later(
    cluster: Cluster,
) -> None:
    gateway = cluster.gateway(breaker_threshold=2, breaker_cooldown=1.5)
    url = gateway.url + "/v1/chat/completions"
    bad = cluster.stubs[0]
    cluster.control(bad, openai_status=500)
    start = time.monotonic()  # the circuit opens after this, so its cooldown ends 1.5 s later
    for _ in range(4):
        assert httpx.post(url, json=CHAT).status_code == 200
    assert metric(gateway.url, "pagedserve_gateway_open_circuits") == 1
    hits = cluster.control(bad)["openai_requests"]
    for _ in range(6):
        assert httpx.post(url, json=CHAT).status_code == 200
    assert cluster.control(bad)["openai_requests"] == hits  # skipped while open
    cluster.control(bad, openai_status=200)

    def tried_again() -> bool:
        assert httpx.post(url, json=CHAT).status_code == 200
        return cluster.control(bad)["openai_requests"] > hits

    wait_until(tried_again, 30, what="a trial request to the skipped worker")
    assert time.monotonic() - start >= 1.5  # not before its cooldown
    assert metric(gateway.url, "pagedserve_gateway_open_circuits") == 0  # the trial worked
    hits = cluster.control(bad)["openai_requests"]
    for _ in range(4):
        assert httpx.post(url, json=CHAT).status_code == 200
    assert cluster.control(bad)["openai_requests"] > hits  # back in rotation


def test_a_slow_first_token_fails_over_and_all_slow_times_out_with_504(
    cluster: Cluster, faults: ServerProcess
) -> None:
    gateway = faults
    url = gateway.url + "/v1/chat/completions"
    cluster.control(cluster.stubs[0], first_byte_delay=5)
    for _ in range(3):
        start = time.monotonic()
        assert httpx.post(url, json={**CHAT, "stream": True}, timeout=30).status_code == 200
        assert time.monotonic() - start < 2.5
    assert metric(gateway.url, "pagedserve_gateway_retries_total", reason="timeout") >= 1
    cluster.control(cluster.stubs[1], first_byte_delay=5)
    start = time.monotonic()
    r = httpx.post(url, json={**CHAT, "stream": True}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    assert time.monotonic() - start < 2.5  # two attempts of 0.5 s, not the stubs' 5 s


def test_the_total_timeout_bounds_a_whole_answer(cluster: Cluster, faults: ServerProcess) -> None:
    gateway = faults
    for s in cluster.stubs:
        cluster.control(s, first_byte_delay=5)
    start = time.monotonic()
    r = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 504 and time.monotonic() - start < 2.5


def test_a_failure_after_the_first_byte_ends_the_stream_with_an_error_event(
    cluster: Cluster, keyed: ServerProcess
) -> None:
    for s in cluster.stubs:
        cluster.control(s, break_after=2)
    before = cluster.served()
    r = httpx.post(
        keyed.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth("eve")
    )
    assert r.status_code == 200
    events = [e[len("data: ") :] for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "upstream_error"
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == ["one", "two"]
    assert sum(cluster.served()) == sum(before) + 1  # too late to fail over: no retry
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEYS["eve"]["key"], max_retries=0)
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(**CHAT, stream=True))
