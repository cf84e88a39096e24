"""Autoscaling with real processes: `pagedserve serve --config` with a tiny model that scales
between one and two replicas (short windows) and one at zero replicas until asked.

A step load (12 streams of 200 tokens, in a bounded loop) takes the first model to two
replicas; once it stops, the idle model goes back to one. The second model's first request is
held at the gateway while its replica starts, and completes (never a 404). Teardown kills the
supervisor's process group and checks that nothing it started is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from processes import Proc, descendants, still_alive_after
from servers import free_port, wait_until


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    gateway: str
    admin: str
    out: Path

    def ready(self, model: str) -> int:
        rows = httpx.get(f"{self.admin}/admin/workers", timeout=5).json()["workers"]
        return sum(1 for r in rows if r["model"] == model and r["state"] == "ready")

    def target(self, model: str) -> int:
        models = httpx.get(f"{self.admin}/admin/status", timeout=5).json()["models"]
        return next(m["replicas"] for m in models if m["name"] == model)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("autoscale")
    engine = {"max_model_len": 256, "kv_cache_memory": 32 << 20}
    ports = {name: free_port() for name in ("admin", "controller", "gateway", "workers")}
    config = {
        "controller": {"port": ports["controller"]},
        "gateway": {"port": ports["gateway"], "cold_start_timeout": 120},
        "admin": {"port": ports["admin"]},
        "log_dir": str(root / "logs"),
        "worker_base_port": ports["workers"],
        "cpu_threads_per_worker": 1,
        "models": [
            {"name": "busy", "model_path": str(tiny_llama), "replicas": 1, "engine": engine,
             "autoscale": {"min_replicas": 1, "max_replicas": 2, "target_queue": 4,
                           "up_after": 2, "down_after": 6, "cooldown": 2}},
            {"name": "sleepy", "model_path": str(tiny_llama), "replicas": 0, "engine": engine,
             "autoscale": {"min_replicas": 0, "max_replicas": 1, "down_after": 600}},
        ],
    }  # fmt: skip
    path = root / "stack.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / "serve.out"
    with out.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.deploy.cli", "serve", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed whole in teardown
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    started: list[Proc] = []
    try:

        def serving() -> bool:
            assert process.poll() is None, out.read_text(errors="replace")
            return "pagedserve is serving" in out.read_text(errors="replace")

        wait_until(serving, 120, interval=0.5, what="the stack")
        started = descendants(process.pid)
        yield Stack(process, f"http://127.0.0.1:{ports['gateway']}",
                    f"http://127.0.0.1:{ports['admin']}", out)  # fmt: skip
    finally:
        started += descendants(process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        left = still_alive_after(started, 10)
        for p in left:
            p.kill()
        assert left == [], f"processes left after the stack was killed: {left}"


class StepLoad:
    """`streams` concurrent streaming completions, each started again when it ends, in a
    thread, until `stop` or `limit` seconds."""

    def __init__(self, gateway: str, model: str, streams: int = 12, limit: float = 120.0) -> None:
        self.gateway, self.model, self.streams, self.limit = gateway, model, streams, limit
        self.done = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> StepLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        body = {"model": self.model, "prompt": "Hello there", "max_tokens": 200,
                "ignore_eos": True, "stream": True}  # fmt: skip
        async with httpx.AsyncClient(timeout=60) as client:

            async def one_stream() -> None:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    try:
                        url = f"{self.gateway}/v1/completions"
                        async with client.stream("POST", url, json=body) as r:
                            async for _ in r.aiter_lines():
                                pass
                            if r.status_code != 200:
                                self.errors.append(str(r.status_code))
                        self.done += 1
                    except httpx.HTTPError as e:
                        self.errors.append(repr(e))
                        await asyncio.sleep(0.5)

            await asyncio.gather(*(one_stream() for _ in range(self.streams)))


def test_step_load_scales_up_and_idle_scales_back_down(stack: Stack) -> None:
    assert stack.ready("busy") == 1
    with StepLoad(stack.gateway, "busy") as load:
        wait_until(lambda: stack.ready("busy") == 2, 100, interval=0.5, what="a second replica")
    assert load.done > 0 and load.errors == [], load.errors[:5]
    # idle: down_after (6 s) and the cooldown, then one fewer; never below min_replicas
    wait_until(lambda: stack.target("busy") == 1, 40, interval=0.5, what="back to one replica")
    wait_until(lambda: stack.ready("busy") == 1, 40, interval=0.5, what="the other one stopped")


def test_a_model_at_zero_serves_its_first_request(stack: Stack) -> None:
    assert stack.target("sleepy") == 0 and stack.ready("sleepy") == 0
    started = time.monotonic()
    reply = httpx.post(
        f"{stack.gateway}/v1/completions",
        json={"model": "sleepy", "prompt": "Hi", "max_tokens": 5},
        timeout=150,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] is not None
    assert time.monotonic() - started < 150
    # the worker served before the supervisor's next look marked it ready
    wait_until(lambda: stack.ready("sleepy") == 1, 10, interval=0.5, what="sleepy ready")
    missing = httpx.post(f"{stack.gateway}/v1/completions",
                         json={"model": "nobody", "prompt": "Hi", "max_tokens": 5}, timeout=30)  # fmt: skip
    assert missing.status_code == 404
