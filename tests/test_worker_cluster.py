"""A controller and two tiny-model workers as real processes, with either store: registration,
streaming through the controller, load-following dispatch, kill -9 and restarts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from servers import (
    RedisServer,
    ServerProcess,
    controller_process,
    free_port,
    redis_or_skip,
    start_all,
    wait_until,
    worker_process,
)

HEARTBEAT = 0.5
EXPIRATION = 3.0
ENGINE = {"kv_cache_memory": 16 << 20, "max_model_len": 512}


@dataclass
class Cluster:
    controller: ServerProcess
    workers: list[ServerProcess]
    new_controller: object  # () -> ServerProcess on the same port and store
    new_worker: object  # (port) -> ServerProcess

    @property
    def url(self) -> str:
        return self.controller.url

    def registered(self) -> dict[str, dict]:
        r = httpx.get(self.url + "/workers", timeout=5)
        return {w["worker_name"]: w for w in r.json()["workers"]}

    def address(self) -> str:
        r = httpx.post(self.url + "/get_worker_address", json={"model": "tiny"}, timeout=5)
        return r.json()["address"]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_or_skip(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module", params=["memory", "redis"])
def cluster(
    request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp(f"cluster-{request.param}")
    store = {}
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        store = {"redis_url": server.url, "redis_prefix": f"cluster{free_port()}"}
    port = free_port()

    def new_controller() -> ServerProcess:
        return controller_process(
            log_dir,
            port=port,
            heartbeat_expiration=EXPIRATION,
            health_check_interval=0.5,
            health_check_failure_threshold=2,
            **store,
        )

    def new_worker(worker_port: int) -> ServerProcess:
        return worker_process(
            log_dir,
            tiny_llama,
            f"http://127.0.0.1:{port}",
            port=worker_port,
            model_names="tiny",
            heartbeat_interval=HEARTBEAT,
            **ENGINE,
        )

    c = Cluster(new_controller().start(), [], new_controller, new_worker)
    try:
        c.workers = [new_worker(free_port()), new_worker(free_port())]
        start_all(*c.workers)
        wait_until(lambda: len(c.registered()) == 2, 10, what="both workers registered")
        yield c
    finally:
        for w in c.workers:
            w.stop()
        c.controller.stop()


def test_both_workers_register_and_stream_through_the_controller(cluster: Cluster) -> None:
    assert httpx.post(cluster.url + "/list_models").json() == {"models": ["tiny"]}
    registered = cluster.registered()
    assert set(registered) == {w.url for w in cluster.workers}
    assert all(w["kind"] == "pagedserve" and w["status"] == "ready" for w in registered.values())
    assert all(w["context_length"] == 512 for w in registered.values())

    # Idle workers share new requests (a heartbeat landing between two picks may reset the
    # dispatched counts, so the exact alternation is not guaranteed on a busy machine).
    picks = [cluster.address() for _ in range(4)]
    assert set(picks) == {w.url for w in cluster.workers}

    body = {"model": "tiny", "prompt": "Hello", "max_new_tokens": 6, "temperature": 0}
    with httpx.stream("POST", cluster.url + "/worker_generate_stream", json=body, timeout=30) as r:
        assert r.status_code == 200
        raw = r.read()
    frames = [json.loads(f) for f in raw.split(b"\0") if f]
    assert frames[-1]["finish_reason"] == "length" and frames[-1]["usage"]["completion_tokens"] == 6
    assert all(f["text"].startswith("Hello") for f in frames)

    # a worker's 400 for bad parameters comes back through the controller as it was
    bad = httpx.post(cluster.url + "/worker_generate_stream", json={**body, "top_p": 7}, timeout=30)
    assert bad.status_code == 400
    assert json.loads(bad.content.rstrip(b"\0"))["error_code"] == 40001


def test_least_load_sends_new_requests_to_the_idle_worker(cluster: Cluster) -> None:
    busy, idle = cluster.workers
    for _attempt in range(3):
        picked, held_throughout = _pick_while_busy(cluster, busy)
        if held_throughout:
            assert picked == idle.url
            return
    pytest.fail("the held requests kept ending before the pick; the machine is too fast for them")


def _pick_while_busy(cluster: Cluster, busy: ServerProcess) -> tuple[str, bool]:
    """Hold 3 streams on `busy`, wait until its heartbeat reports them, then pick a worker.
    Returns the pick and whether all 3 streams were still running when it came back: they end
    by themselves at max_model_len, and a heartbeat after that would rightly report none."""
    stop = threading.Event()
    ended = threading.Event()

    def hold() -> None:  # a request streaming until the test lets go
        body = {"model": "tiny", "prompt": "Go", "max_tokens": 500, "ignore_eos": True}
        with httpx.stream(
            "POST", busy.url + "/v1/completions", json={**body, "stream": True}, timeout=30
        ) as r:
            for _ in r.iter_raw():
                if stop.is_set():
                    return
        ended.set()

    holders = [threading.Thread(target=hold) for _ in range(3)]
    for t in holders:
        t.start()
    try:
        # ... and until the other worker's heartbeat has cleared what earlier tests dispatched
        # to it (requests the controller counts until the worker reports its own queue)
        def loads_reported() -> bool:
            registered = cluster.registered()
            others = [w for url, w in registered.items() if url != busy.url]
            return registered[busy.url]["queue_length"] >= 3 and all(
                w["dispatched"] == 0 for w in others
            )

        wait_until(loads_reported, 10, what="load reported")
        picked = cluster.address()
        return picked, not ended.is_set()
    finally:
        stop.set()
        for t in holders:
            t.join(30)
        wait_until(lambda: cluster.registered()[busy.url]["queue_length"] == 0, 5, what="load gone")


def test_a_killed_worker_leaves_the_registry_and_a_restarted_one_returns(cluster: Cluster) -> None:
    victim, survivor = cluster.workers
    victim.kill()
    start = time.monotonic()
    wait_until(
        lambda: victim.url not in cluster.registered(), EXPIRATION + 2, what="killed worker gone"
    )
    assert time.monotonic() - start <= EXPIRATION + 2
    assert {cluster.address() for _ in range(3)} == {survivor.url}

    reborn = cluster.new_worker(victim.port)
    cluster.workers[0] = reborn
    reborn.start()
    wait_until(lambda: reborn.url in cluster.registered(), 5, what="restarted worker back")
    assert {cluster.address() for _ in range(4)} == {reborn.url, survivor.url}


def test_a_restarted_controller_relearns_every_worker_within_a_heartbeat(cluster: Cluster) -> None:
    cluster.controller.kill()
    cluster.controller = cluster.new_controller().start()
    start = time.monotonic()
    wait_until(lambda: len(cluster.registered()) == 2, 5, interval=0.05, what="workers relearned")
    assert time.monotonic() - start <= HEARTBEAT + 1.0
    assert httpx.post(cluster.url + "/list_models").json() == {"models": ["tiny"]}
