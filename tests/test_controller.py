"""The controller as a real process (both stores), with stub workers as real processes."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import (
    RedisServer,
    ServerProcess,
    controller_process,
    free_port,
    redis_or_skip,
    stub_worker_process,
    wait_until,
)

_ports = itertools.count(40000)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_or_skip(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module", params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """None for the in-memory store, else the URL of a real redis-server."""
    if request.param == "memory":
        return None
    return request.getfixturevalue("redis_server").url


@pytest.fixture(scope="module")
def shared_controller(
    store_url: str | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One controller for the protocol tests; health checks off (the workers are fake
    addresses), expiry long. Each test uses its own model names."""
    log_dir = tmp_path_factory.mktemp("controller")
    prefix = f"shared{free_port()}"
    with controller_process(
        log_dir,
        redis_url=store_url,
        redis_prefix=prefix,
        health_check_interval=0,
        heartbeat_expiration=300,
    ).start() as ctl:
        yield ctl


def fake_address() -> str:
    """An address nobody listens on (fine while health checks are off)."""
    return f"http://127.0.0.1:{next(_ports)}"


def register(ctl: str, address: str, models: list[str], **status) -> httpx.Response:
    body = {
        "worker_name": address,
        "check_heart_beat": True,
        "worker_status": {"model_names": models, "speed": 1, "queue_length": 0, **status},
        "multimodal": False,
    }
    return httpx.post(ctl + "/register_worker", json=body, timeout=5)


def post(ctl: str, path: str, body: object = None) -> httpx.Response:
    return httpx.post(ctl + path, json=body, timeout=5)


def address_for(ctl: str, model: str) -> str:
    return post(ctl, "/get_worker_address", {"model": model}).json()["address"]


def workers(ctl: str) -> dict[str, dict]:
    return {w["worker_name"]: w for w in httpx.get(ctl + "/workers", timeout=5).json()["workers"]}


def test_registration_listing_and_dispatch_keep_fastchat_shapes(
    shared_controller: ServerProcess,
) -> None:
    ctl = shared_controller.url
    a, b = fake_address(), fake_address()
    r = register(ctl, a, ["alpha", "alpha-alias"])
    assert r.status_code == 200 and r.json()["registered"] is True
    assert register(ctl, b + "/", ["alpha"], worker_id="w-b").json()["worker_id"] == "w-b"

    models = post(ctl, "/list_models").json()["models"]
    assert {"alpha", "alpha-alias"} <= set(models)
    assert post(ctl, "/list_language_models").json()["models"] == models
    picks = [address_for(ctl, "alpha") for _ in range(4)]
    assert sorted(picks) == sorted([a, a, b, b])  # equal load: they alternate
    assert address_for(ctl, "alpha-alias") == a

    assert post(ctl, "/receive_heart_beat", {"worker_name": a, "queue_length": 2}).json() == {
        "exist": True
    }
    unknown = post(ctl, "/receive_heart_beat", {"worker_name": fake_address(), "queue_length": 0})
    assert unknown.status_code == 200 and unknown.json() == {"exist": False}

    listed = workers(ctl)
    assert listed[a]["queue_length"] == 2 and listed[a]["dispatched"] == 0  # reset by heartbeat
    assert listed[a]["kind"] == "fastchat" and listed[b]["kind"] == "pagedserve"
    assert listed[b]["worker_id"] == "w-b" and listed[b]["status"] == "ready"
    status = post(ctl, "/worker_get_status").json()
    assert {"alpha", "alpha-alias"} <= set(status["model_names"]) and status["speed"] >= 2
    assert httpx.get(ctl + "/test_connection").json() == "success"
    assert httpx.get(ctl + "/health").json() == {"status": "ok"}
    assert "pagedserve_controller_registrations_total" in httpx.get(ctl + "/metrics").text


def test_least_load_follows_the_reported_load(shared_controller: ServerProcess) -> None:
    ctl = shared_controller.url
    busy, idle = fake_address(), fake_address()
    register(ctl, busy, ["beta"], worker_id="busy")
    register(ctl, idle, ["beta"], worker_id="idle")
    post(
        ctl,
        "/receive_heart_beat",
        {"worker_name": busy, "queue_length": 3, "worker_id": "busy", "kv_usage": 0.5},
    )
    post(ctl, "/receive_heart_beat", {"worker_name": idle, "queue_length": 0, "worker_id": "idle"})
    picks = [address_for(ctl, "beta") for _ in range(5)]
    assert picks[:3] == [idle] * 3  # 3.5 against 0, 1, 2
    assert picks.count(busy) == 1


def test_draining_workers_get_no_new_requests(shared_controller: ServerProcess) -> None:
    ctl = shared_controller.url
    a, b = fake_address(), fake_address()
    register(ctl, a, ["gamma"], worker_id="gamma-a")
    register(ctl, b, ["gamma"], worker_id="gamma-b")

    r = post(
        ctl,
        "/receive_heart_beat",
        {"worker_name": a, "queue_length": 0, "worker_id": "gamma-a", "state": "draining"},
    )
    assert r.json() == {"exist": True}
    assert {address_for(ctl, "gamma") for _ in range(3)} == {b}

    r = post(ctl, "/workers/gamma-b/drain")
    assert r.status_code == 200 and r.json()["status"] == "draining"
    assert address_for(ctl, "gamma") == ""
    assert "gamma" not in post(ctl, "/list_models").json()["models"]
    assert workers(ctl)[b]["status"] == "draining"
    # a heartbeat does not undo an operator's drain
    post(
        ctl,
        "/receive_heart_beat",
        {"worker_name": b, "queue_length": 0, "worker_id": "gamma-b", "state": "ready"},
    )
    assert address_for(ctl, "gamma") == ""


def test_a_worker_restarted_at_the_same_address_is_asked_to_register(
    shared_controller: ServerProcess,
) -> None:
    ctl = shared_controller.url
    a = fake_address()
    register(ctl, a, ["delta"], worker_id="first-life")
    r = post(
        ctl,
        "/receive_heart_beat",
        {"worker_name": a, "queue_length": 0, "worker_id": "second-life"},
    )
    assert r.json() == {"exist": False}
    assert workers(ctl)[a]["worker_id"] == "first-life"


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/register_worker", {"check_heart_beat": True}, "worker_name"),
        (
            "/register_worker",
            {"worker_name": "not a url", "worker_status": {"model_names": ["x"]}},
            "base URL",
        ),
        (
            "/register_worker",
            {"worker_name": "http://127.0.0.1:1", "worker_status": {"model_names": []}},
            "model_names",
        ),
        (
            "/register_worker",
            {"worker_name": "http://127.0.0.1:1", "worker_status": {"model_names": [""]}},
            "empty",
        ),
        (
            "/register_worker",
            {
                "worker_name": "http://127.0.0.1:1",
                "worker_status": {"model_names": ["x"], "queue_length": -1},
            },
            "queue_length",
        ),
        (
            "/register_worker",
            {
                "worker_name": "http://127.0.0.1:1",
                "worker_status": {"model_names": ["x"], "kv_usage": 7},
            },
            "kv_usage",
        ),
        ("/register_worker", [1, 2], "body"),
        ("/register_worker", "just a string", "body"),
        ("/receive_heart_beat", {"worker_name": "http://127.0.0.1:1"}, "queue_length"),
        (
            "/receive_heart_beat",
            {"worker_name": "http://127.0.0.1:1", "queue_length": "many"},
            "queue_length",
        ),
        (
            "/receive_heart_beat",
            {"worker_name": "http://127.0.0.1:1", "queue_length": 0, "state": "sleepy"},
            "state",
        ),
        ("/get_worker_address", {}, "model"),
        ("/get_worker_address", {"model": ""}, "model"),
        ("/worker_generate_stream", {"prompt": "hi"}, "model"),
        ("/worker_generate_stream", ["model"], "body"),
    ],
)
def test_bad_input_gets_a_400_that_says_what_is_wrong_and_changes_nothing(
    shared_controller: ServerProcess, path: str, body: object, says: str
) -> None:
    ctl = shared_controller.url
    before = {k: {**v, "seconds_since_heart_beat": 0} for k, v in workers(ctl).items()}
    r = post(ctl, path, body)
    assert r.status_code == 400, r.text
    payload = json.loads(r.content.rstrip(b"\0"))
    assert payload["error_code"] == 40001
    assert says in payload["text"]
    after = {k: {**v, "seconds_since_heart_beat": 0} for k, v in workers(ctl).items()}
    assert after == before
    assert httpx.get(ctl + "/health").status_code == 200


def test_malformed_json_and_unknown_names_are_4xx(shared_controller: ServerProcess) -> None:
    ctl = shared_controller.url
    r = httpx.post(
        ctl + "/register_worker", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error_code"] == 40001

    r = post(ctl, "/get_worker_address", {"model": "no-such-model"})
    assert r.status_code == 200  # FastChat's clients expect 200 and ""
    assert r.json()["address"] == "" and "no-such-model" in r.json()["text"]

    r = post(ctl, "/worker_generate_stream", {"model": "no-such-model", "prompt": "hi"})
    assert r.status_code == 404
    assert r.content.endswith(b"\0")
    assert json.loads(r.content[:-1])["error_code"] == 50005

    r = post(ctl, "/workers/no-such-id/drain")
    assert r.status_code == 404 and "no-such-id" in r.json()["text"]


def test_generate_stream_is_relayed_from_a_worker_with_its_nul_framing(
    shared_controller: ServerProcess, tmp_path: Path
) -> None:
    ctl = shared_controller.url
    with stub_worker_process(
        tmp_path, ctl, model_names="stub-relay", reply="one two three"
    ).start() as stub:
        wait_until(
            lambda: "stub-relay" in post(ctl, "/list_models").json()["models"],
            10,
            what="stub registered",
        )
        for path in ("/worker_generate_stream", "/worker_api_generate_stream"):
            with httpx.stream(
                "POST", ctl + path, json={"model": "stub-relay", "prompt": "x"}, timeout=10
            ) as r:
                assert r.status_code == 200
                raw = r.read()
            frames = [json.loads(f) for f in raw.split(b"\0") if f]
            assert [f["text"] for f in frames] == ["one", "one two", "one two three"]
            assert frames[-1]["finish_reason"] == "stop" and frames[0]["worker"] == stub.url


# -- upkeep: each test its own controller ------------------------------------------------------


def test_a_silent_worker_expires_and_an_unchecked_one_stays(
    store_url: str | None, tmp_path: Path
) -> None:
    with controller_process(
        tmp_path,
        redis_url=store_url,
        redis_prefix=f"exp{free_port()}",
        heartbeat_expiration=1.0,
        health_check_interval=0,
    ).start() as ctl:
        silent, unchecked = fake_address(), fake_address()
        register(ctl.url, silent, ["eps"])
        httpx.post(
            ctl.url + "/register_worker",
            json={
                "worker_name": unchecked,
                "check_heart_beat": False,
                "worker_status": {"model_names": ["eps"]},
            },
        )
        assert set(workers(ctl.url)) == {silent, unchecked}
        wait_until(lambda: silent not in workers(ctl.url), 5, what="silent worker expired")
        assert address_for(ctl.url, "eps") == unchecked
        assert 'reason="expired"' in httpx.get(ctl.url + "/metrics").text


def test_a_restarted_controller_gives_workers_in_redis_time_to_reach_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Down longer than the expiration, a controller must not come back and drop every worker
    at once for heartbeats it could not have heard (FastChat clients then get "no worker")."""
    options = {
        "redis_url": redis_server.url,
        "redis_prefix": f"restart{free_port()}",
        "heartbeat_expiration": 2.0,
        "health_check_interval": 0,
    }
    port = free_port()
    worker = fake_address()
    with controller_process(tmp_path, port=port, **options).start() as ctl:
        register(ctl.url, worker, ["eps"])
    time.sleep(2.5)  # down for longer than the expiration
    with controller_process(tmp_path, port=port, **options).start() as ctl:
        assert address_for(ctl.url, "eps") == worker
        assert worker in workers(ctl.url)
        # and a worker that stays silent still goes, once the new controller has waited
        wait_until(lambda: worker not in workers(ctl.url), 10, what="silent worker expired")


def test_health_checks_remove_the_unreachable_and_hold_back_the_unready(
    store_url: str | None, tmp_path: Path
) -> None:
    with (
        controller_process(
            tmp_path,
            redis_url=store_url,
            redis_prefix=f"hc{free_port()}",
            health_check_interval=0.2,
            health_check_failure_threshold=2,
            heartbeat_expiration=60,
        ).start() as ctl,
        stub_worker_process(tmp_path, ctl.url, model_names="zeta").start() as stub,
    ):
        dead = fake_address()
        register(ctl.url, dead, ["zeta"], worker_id="dead")
        wait_until(lambda: stub.url in workers(ctl.url), 10, what="stub registered")
        wait_until(lambda: dead not in workers(ctl.url), 5, what="unreachable worker removed")

        httpx.post(stub.url + "/_control", json={"ready": 503})
        wait_until(
            lambda: workers(ctl.url)[stub.url]["status"] == "unready", 5, what="stub unready"
        )
        assert address_for(ctl.url, "zeta") == ""
        assert stub.url in workers(ctl.url)  # answered: not removed

        httpx.post(stub.url + "/_control", json={"ready": 200})
        wait_until(lambda: address_for(ctl.url, "zeta") == stub.url, 5, what="stub ready again")


def test_a_restarted_controller_relearns_its_workers_within_a_heartbeat(tmp_path: Path) -> None:
    port = free_port()
    ctl = controller_process(tmp_path, port=port, health_check_interval=0).start()
    try:
        with (
            stub_worker_process(
                tmp_path, ctl.url, model_names="eta", heartbeat_interval=0.5
            ).start(),
            stub_worker_process(
                tmp_path, ctl.url, model_names="theta", kind="fastchat", heartbeat_interval=0.5
            ).start(),
        ):
            wait_until(lambda: len(workers(ctl.url)) == 2, 10, what="both registered")
            ctl.kill()
            ctl = controller_process(tmp_path, port=port, health_check_interval=0).start()
            wait_until(lambda: len(workers(ctl.url)) == 2, 1.5, interval=0.05, what="both back")
            assert set(post(ctl.url, "/list_models").json()["models"]) == {"eta", "theta"}
    finally:
        ctl.stop()


def test_two_replicas_share_one_redis_registry(redis_server: RedisServer, tmp_path: Path) -> None:
    prefix = f"replicas{free_port()}"
    options = {"redis_url": redis_server.url, "redis_prefix": prefix, "health_check_interval": 0.3}
    with (
        controller_process(tmp_path, **options).start() as one,
        controller_process(tmp_path, **options).start() as two,
        stub_worker_process(
            tmp_path, one.url, model_names="iota", heartbeat_interval=0.5
        ).start() as a,
        stub_worker_process(
            tmp_path, two.url, model_names="iota", heartbeat_interval=0.5
        ).start() as b,
    ):
        wait_until(
            lambda: set(workers(one.url)) == {a.url, b.url}, 10, what="both seen by replica one"
        )
        assert set(workers(two.url)) == {a.url, b.url}
        # dispatch counts are shared: alternating replicas still alternate workers
        picks = [address_for(ctl.url, "iota") for ctl in (one, two, one, two)]
        assert sorted(picks) == sorted([a.url, a.url, b.url, b.url])
        # a heartbeat sent to replica two keeps a worker registered through replica one
        r = post(two.url, "/receive_heart_beat", {"worker_name": a.url, "queue_length": 0})
        assert r.json() == {"exist": True}
        # one replica gone: the other still serves the whole registry
        one.kill()
        assert set(workers(two.url)) == {a.url, b.url}
        b.kill()
        wait_until(lambda: set(workers(two.url)) == {a.url}, 5, what="killed worker removed")


def test_a_redis_backed_controller_keeps_its_registry_across_restarts(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    options = {
        "redis_url": redis_server.url,
        "redis_prefix": f"restart{free_port()}",
        "health_check_interval": 0,
    }
    address = fake_address()
    with controller_process(tmp_path, **options).start() as ctl:
        register(ctl.url, address, ["kappa"], worker_id="k")
    with controller_process(tmp_path, **options).start() as ctl:
        assert address_for(ctl.url, "kappa") == address


def test_redis_down_gives_503_not_a_crash(tmp_path: Path) -> None:
    if __import__("shutil").which("redis-server") is None:
        pytest.skip(
            "redis-server is not on PATH; install it with `apt-get install -y redis-server`"
        )
    redis = RedisServer(tmp_path).start()
    try:
        with controller_process(
            tmp_path, redis_url=redis.url, health_check_interval=0
        ).start() as ctl:
            redis.stop()
            assert httpx.get(ctl.url + "/health").status_code == 503  # asks Redis
            # the hot routes answer from the view and learn of it at the next sweep (< 1 s)
            body = {"model": "m", "worker_name": fake_address(), "queue_length": 0}

            def refused(path: str) -> httpx.Response | None:
                r = post(ctl.url, path, body)
                return r if r.status_code == 503 else None

            for path in ("/list_models", "/get_worker_address", "/receive_heart_beat"):
                r = wait_until(lambda p=path: refused(p), 3, what=f"{path} answers 503")
                assert "Redis" in r.json()["text"]
            assert ctl.alive
    finally:
        redis.stop()
