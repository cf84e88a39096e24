"""The control plane as the reliability suite runs it: a real redis-server, a controller that
keeps its registry there, two tiny-model workers and a gateway, on loopback ports. Short header
timeouts (2 s) so that slow clients are cut off within a bounded test.

`control_stack` is one stack for all of tests/reliability (a session fixture registered in its
conftest.py, which stops it after the last test that uses it rather than at the end of the
whole suite): starting two workers costs more than most scenarios, and each scenario leaves the
stack as it found it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from servers import (
    RedisServer,
    ServerProcess,
    controller_process,
    free_port,
    gateway_process,
    redis_or_skip,
    start_all,
    wait_until,
    worker_process,
)

HEADER_TIMEOUT = 2.0
BODY_LIMIT = 2 << 20  # the controller's and workers' (8 MiB by default), to see memory held
ENGINE = {"kv_cache_memory": 16 << 20, "max_model_len": 512, "cpu_threads": 1}
MODEL = "tiny"


@dataclass
class ControlStack:
    redis: RedisServer
    controller: ServerProcess
    workers: list[ServerProcess]
    gateway: ServerProcess
    log_dir: Path
    model_path: Path
    extra: list[ServerProcess] = field(default_factory=list)

    def new_controller(self) -> ServerProcess:
        """A controller on the stack's port and Redis store (to restart it)."""
        return controller_process(
            self.log_dir,
            port=self.controller.port,
            redis_url=self.redis.url,
            redis_prefix="reliability",
            heartbeat_expiration=5,
            health_check_interval=0.5,
            health_check_failure_threshold=3,
            header_timeout=HEADER_TIMEOUT,
            max_body_bytes=BODY_LIMIT,
        )

    def new_gateway(self, **options: object) -> ServerProcess:
        """Another gateway in front of the controller, stopped with the stack; ready once it
        routes to the model."""
        gateway = gateway_process(
            self.log_dir,
            self.controller.url,
            routing_refresh_interval=0.5,
            header_timeout=HEADER_TIMEOUT,
            **options,
        )
        self.extra.append(gateway)
        gateway.start(timeout=60)
        wait_until(lambda: serves_model(gateway), 30, what="the new gateway routes to the model")
        return gateway

    def stop(self) -> None:
        for p in (*self.extra, self.gateway, *self.workers, self.controller):
            p.stop()

    def registered(self) -> set[str]:
        workers = httpx.get(self.controller.url + "/workers", timeout=5).json()["workers"]
        return {w["worker_name"] for w in workers}

    def healthy(self) -> None:
        """Every process answers its health probe, and a real request goes through the gateway
        and through the controller (FastChat's protocol)."""
        for p in (self.controller, *self.workers, self.gateway):
            assert p.alive, f"{p.name} on {p.port} died:\n{p.log_tail()}"
            r = httpx.get(p.url + "/health", timeout=5)
            assert r.status_code == 200, (p.name, r.status_code, r.text)
        completion(self.gateway.url)
        body = {"model": MODEL, "prompt": "Hello", "max_new_tokens": 2, "temperature": 0}
        url = self.controller.url + "/worker_generate_stream"
        with httpx.stream("POST", url, json=body, timeout=30) as r:
            assert r.status_code == 200, r.read()
            frames = [f for f in r.read().split(b"\0") if f]
        assert b'"error_code": 0' in frames[-1] or b'"error_code":0' in frames[-1], frames[-1]


def completion(gateway_url: str, max_tokens: int = 2, timeout: float = 30) -> dict:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(gateway_url + "/v1/completions", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["finish_reason"] in ("length", "stop"), answer
    return answer


def serves_model(gateway: ServerProcess) -> bool:
    models = httpx.get(gateway.url + "/v1/models", timeout=5).json()["data"]
    return [m["id"] for m in models] == [MODEL]


def rss_bytes(p: ServerProcess) -> int:
    """The process's resident memory now."""
    assert p.proc is not None
    for line in Path(f"/proc/{p.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no VmRSS")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def control_stack(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlStack]:
    log_dir = tmp_path_factory.mktemp("control-stack")
    with redis_or_skip(log_dir) as redis:
        placeholder = ServerProcess("controller", [], free_port(), log_dir)
        stack = ControlStack(redis, placeholder, [], placeholder, log_dir, tiny_llama)
        stack.controller = stack.new_controller().start()
        try:
            stack.workers = [
                worker_process(
                    log_dir,
                    tiny_llama,
                    stack.controller.url,
                    model_names=MODEL,
                    heartbeat_interval=0.5,
                    header_timeout=HEADER_TIMEOUT,
                    max_body_bytes=BODY_LIMIT,
                    **ENGINE,
                )
                for _ in range(2)
            ]
            stack.gateway = gateway_process(
                log_dir,
                stack.controller.url,
                routing_refresh_interval=0.5,
                header_timeout=HEADER_TIMEOUT,
            )
            start_all(*stack.workers, stack.gateway, timeout=300)  # a cold kernel build: minutes
            wait_until(
                lambda: (
                    stack.registered() == {w.url for w in stack.workers}
                    and serves_model(stack.gateway)
                ),
                30,
                what="both workers registered and the gateway routing",
            )
            started = time.monotonic()
            completion(stack.gateway.url)  # the first request warms the engines up
            stack.healthy()
            print(f"[control_stack] warm in {time.monotonic() - started:.1f}s")
            yield stack
        finally:
            stack.stop()
