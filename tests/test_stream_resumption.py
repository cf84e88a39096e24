"""A stream survives its worker: two tiny-model workers serve one model behind the gateway,
16 streams of 200 tokens run (chat and completions, greedy and seeded), and the worker serving
most of them is killed with -9 mid-stream. Every stream must complete without an error event,
with the text, token count and finish reason of the same request in a run without the fault."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from servers import (
    ServerProcess,
    controller_process,
    gateway_process,
    metric,
    start_all,
    wait_until,
    worker_process,
)

ENGINE = {"kv_cache_memory": 32 << 20, "max_model_len": 512}
TOKENS = 200
STREAMS = 16


@dataclass
class Stack:
    controller: ServerProcess
    workers: list[ServerProcess]
    gateway: ServerProcess


@pytest.fixture(scope="module")
def stack(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("resume")
    with controller_process(log_dir, health_check_interval=1).start() as ctl:
        workers = [
            worker_process(
                log_dir, tiny_llama, ctl.url, model_names="tiny", heartbeat_interval=1, **ENGINE
            )
            for _ in range(2)
        ]
        gateway = gateway_process(log_dir, ctl.url, routing_refresh_interval=0.5)
        try:
            start_all(*workers, gateway)
            wait_until(
                lambda: len(httpx.get(ctl.url + "/workers").json()["workers"]) == 2,
                15,
                what="both workers registered",
            )
            yield Stack(ctl, workers, gateway)
        finally:
            for p in (gateway, *workers):
                p.stop()


def request(i: int) -> tuple[str, dict]:
    """Stream i: chat or completion, greedy or (every fourth) seeded sampling."""
    body: dict = {
        "model": "tiny",
        "max_tokens": TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    if i % 4 == 3:
        body |= {"temperature": 0.9, "top_p": 0.95, "seed": 1000 + i}
    if i % 2:
        body["messages"] = [{"role": "user", "content": f"Tell me story number {i}."}]
        return "/v1/chat/completions", body
    body["prompt"] = f"Once upon a time, in the village number {i},"
    return "/v1/completions", body


@dataclass
class Stream:
    path: str
    body: dict
    text: str = ""
    events: int = 0
    worker: str = ""
    usage: dict | None = None
    finish: str | None = None
    errors: list = field(default_factory=list)
    roles: int = 0  # chat chunks that carry the role: one per answer
    ids: set = field(default_factory=set)  # completion ids seen: one per answer
    done: bool = False
    failure: str | None = None

    def run(self, url: str) -> None:
        try:
            with httpx.stream("POST", url + self.path, json=self.body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                self.worker = r.headers["x-pagedserve-route"]
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.done = True
                        continue
                    self.take(json.loads(line[6:]))
        except Exception as e:  # noqa: BLE001 - recorded and asserted on
            self.failure = repr(e)

    def take(self, chunk: dict) -> None:
        self.events += 1
        if "error" in chunk:
            self.errors.append(chunk["error"])
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        self.ids.add(chunk.get("id"))
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta")
            self.roles += bool(delta and delta.get("role"))
            self.text += (delta.get("content") if delta else choice.get("text")) or ""
            self.finish = choice.get("finish_reason") or self.finish
            assert "token_ids" not in choice and "token_ids" not in (delta or {})


def run_all(url: str, on_progress=None) -> list[Stream]:
    streams = [Stream(*request(i)) for i in range(STREAMS)]
    threads = [threading.Thread(target=s.run, args=(url,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    if on_progress is not None:
        on_progress(streams)
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    return streams


def test_streams_complete_with_the_same_text_when_their_worker_is_killed(stack: Stack) -> None:
    url = stack.gateway.url
    clean = run_all(url)
    for s in clean:
        assert s.failure is None and not s.errors and s.done, (s.failure, s.errors)
        assert s.usage["completion_tokens"] == TOKENS and s.finish == "length"

    killed: list[str] = []

    def kill_mid_stream(streams: list[Stream]) -> None:
        def busiest() -> str | None:
            """Once half the streams are under way: the worker serving most of those still
            running (its id is in the route header). Waiting for all of them would let the
            first ones end on a loaded machine, and leave nothing to resume."""
            if any(s.failure for s in streams):
                return "failed"
            if sum(s.events >= 4 for s in streams) < STREAMS // 2:
                return None
            running: dict[str, int] = {}
            for s in streams:
                if s.events >= 2 and not s.done:
                    wid = s.worker.split("worker=")[1].split(";")[0]
                    running[wid] = running.get(wid, 0) + 1
            return max(running, key=running.get) if running else None

        victim_id = wait_until(busiest, 120, interval=0.01, what="streams under way")
        assert victim_id != "failed", [s.failure for s in streams]
        listed = httpx.get(stack.controller.url + "/workers").json()["workers"]
        address = next(w["worker_name"] for w in listed if w["worker_id"] == victim_id)
        victim = next(w for w in stack.workers if w.url == address)
        unfinished = sum(1 for s in streams if not s.done and victim_id in s.worker)
        victim.kill()
        killed.append(victim_id)
        assert unfinished >= 1, "the streams ended before the kill: nothing to resume"

    started = time.monotonic()
    faulty = run_all(url, kill_mid_stream)
    assert killed
    for before, after in zip(clean, faulty, strict=True):
        assert after.failure is None and not after.errors and after.done, (
            after.failure,
            after.errors,
        )
        assert after.text == before.text
        assert after.roles == before.roles == (1 if "messages" in after.body else 0)
        assert len(after.ids) == 1
        assert after.usage["completion_tokens"] == TOKENS and after.finish == "length"
    assert metric(url, "pagedserve_gateway_resumed_streams_total", result="resumed") >= 1
    assert metric(url, "pagedserve_gateway_resumed_streams_total", result="failed") == 0
    assert time.monotonic() - started < 150
