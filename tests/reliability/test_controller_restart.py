"""The controller goes away (SIGTERM, or kill -9) and comes back on the same port, its registry
in Redis, while clients keep sending: OpenAI requests through the gateway and FastChat streams
through the controller. Nothing may hang or be lost; a request meeting the gap may get a clear
error (recorded by kind); once the controller is back, every request succeeds."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import pytest
from control_stack import MODEL, ControlStack
from ledger import Ledger, scaled
from servers import wait_until

CLIENT_TIMEOUT = 30.0  # far above any answer here: reaching it means a request hung


class Clock:
    """When the controller went away and when it was back (monotonic seconds)."""

    def __init__(self) -> None:
        self.down_at = float("inf")
        self.back_at = float("inf")
        self.phases: Counter[str] = Counter()
        self.lock = threading.Lock()

    def phase(self, sent: float, ended: float) -> str:
        if ended < self.down_at:
            return "before"
        return "after" if sent >= self.back_at else "gap"

    def count(self, phase: str) -> None:
        with self.lock:
            self.phases[phase] += 1


def gateway_request(url: str, ledger: Ledger, clock: Clock, failures_after: list[str]) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    ledger.send()
    sent = time.monotonic()
    try:
        r = httpx.post(url + "/v1/completions", json=body, timeout=CLIENT_TIMEOUT)
    except httpx.TimeoutException:
        ledger.lose("gateway: no answer in time")
        return
    except httpx.HTTPError as e:
        ledger.lose(f"gateway: {type(e).__name__}")
        return
    phase = clock.phase(sent, time.monotonic())
    clock.count(phase)
    if r.status_code == 200:
        choice = r.json()["choices"][0]
        if choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str):
            ledger.complete()
        else:
            ledger.lose(f"gateway: bad answer {choice}")
        return
    code = r.json().get("error", {}).get("code")  # a clear error must say what it is
    ledger.error(f"gateway {r.status_code} {code} ({phase})")
    if phase == "after":
        failures_after.append(f"gateway {r.status_code}: {r.text}")


def fastchat_request(url: str, ledger: Ledger, clock: Clock, failures_after: list[str]) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_new_tokens": 4, "temperature": 0}
    ledger.send()
    sent = time.monotonic()
    try:
        with httpx.stream(
            "POST", url + "/worker_generate_stream", json=body, timeout=CLIENT_TIMEOUT
        ) as r:
            frames = [json.loads(f) for f in r.read().split(b"\0") if f]
    except httpx.TimeoutException:
        ledger.lose("controller: no answer in time")
        return
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
        # the controller is down (refused) or went down under the stream (cut): clear to
        # the client at once, and it cannot happen once the controller is back
        phase = clock.phase(sent, time.monotonic())
        clock.count(phase)
        ledger.error(f"controller {type(e).__name__} ({phase})")
        if phase != "gap":
            failures_after.append(f"controller {phase}: {e!r}")
        return
    phase = clock.phase(sent, time.monotonic())
    clock.count(phase)
    last = frames[-1] if frames else {}
    if r.status_code == 200 and last.get("error_code") == 0 and last.get("finish_reason"):
        ledger.complete()
        return
    if "error_code" not in last:
        ledger.lose(f"controller: unframed answer {r.status_code}")
        return
    ledger.error(f"controller {r.status_code} error_code {last['error_code']} ({phase})")
    if phase == "after":
        failures_after.append(f"controller {r.status_code}: {last}")


@pytest.mark.parametrize("how", ["sigterm", "kill"])
def test_controller_restart_with_redis_store(
    control_stack: ControlStack, ledger: Ledger, how: str
) -> None:
    stack = control_stack
    before, after = scaled(4, 40), scaled(8, 120)
    clock, failures_after = Clock(), []
    stop, done = threading.Event(), Counter[str]()

    def client(name: str, request) -> None:  # type: ignore[no-untyped-def]
        url = stack.controller.url if name == "fastchat" else stack.gateway.url
        while not stop.is_set():
            request(url, ledger, clock, failures_after)
            done[name] += 1

    clients = [
        threading.Thread(target=client, args=(f"openai-{i}", gateway_request)) for i in range(2)
    ]
    clients.append(threading.Thread(target=client, args=("fastchat", fastchat_request)))
    for t in clients:
        t.start()
    try:
        wait_until(lambda: min(done.values(), default=0) >= before and len(done) == 3, 120)
        clock.down_at = time.monotonic()
        if how == "kill":
            stack.controller.kill()
        else:
            stack.controller.stop(timeout=15)
        time.sleep(1.0)  # the gap: requests meet a closed port
        stack.controller = stack.new_controller().start(timeout=60)
        clock.back_at = time.monotonic()
        # the registry lived in Redis: both workers are known at once
        assert stack.registered() == {w.url for w in stack.workers}
        counts = dict(done)
        wait_until(
            lambda: all(done[n] - counts[n] >= after for n in counts),
            300,
            what=f"{after} requests per client after the restart",
        )
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=CLIENT_TIMEOUT + 10)
    assert not any(t.is_alive() for t in clients), "a client hung"
    ledger.notes.update(
        how=how,
        gap_seconds=round(clock.back_at - clock.down_at, 2),
        by_phase=dict(clock.phases),
        by_client=dict(done),
    )
    assert ledger.lost == 0, ledger.errors
    assert not failures_after, failures_after[:5]
    assert ledger.sent == ledger.completed + sum(ledger.errors.values())
    stack.healthy()
