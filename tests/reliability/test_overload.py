"""More requests at once than the gateway's --max-concurrent-requests (the only service with such
a limit): those over it get a fast 503 with an OpenAI error body and Retry-After, never a place
in an unbounded queue; the admitted ones complete whole; the gateway is healthy afterwards."""

from __future__ import annotations

import json
import threading
import time

import httpx
from control_stack import MODEL, ControlStack, completion
from ledger import Ledger, scaled
from servers import metric, wait_until

LIMIT = 2
AT_ONCE = 16
REFUSAL_BOUND = 1.0  # seconds a refusal may take


def streamed_request(
    url: str, ledger: Ledger, start: threading.Barrier, refusals: list[float]
) -> None:
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 48,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(base_url=url, timeout=60) as client:
        # connected before the rush, so that the latency measured is the gateway's answer
        # (not a busy machine's connection set-up)
        assert client.get("/health").status_code == 200
        start.wait()
        ledger.send()
        sent = time.monotonic()
        try:
            with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    refusals.append(time.monotonic() - sent)
                    error = json.loads(r.read())["error"]
                    assert error["message"] and error["type"], error
                    ledger.error(f"{r.status_code} {error['code']}")
                    if r.status_code not in (429, 503) or "retry-after" not in r.headers:
                        ledger.lose(f"refused without a retryable status: {r.status_code}")
                    return
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
        except httpx.HTTPError as e:
            ledger.lose(type(e).__name__)
            return
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    if events[-1] == "data: [DONE]" and chunks and chunks[-1]["choices"][0]["finish_reason"]:
        ledger.complete()
    else:
        ledger.lose("stream ended without its finish and [DONE]")


def test_overload_past_max_concurrent_requests(control_stack: ControlStack, ledger: Ledger) -> None:
    gateway = control_stack.new_gateway(max_concurrent_requests=LIMIT, public_metrics=True)
    refusals: list[float] = []
    for _ in range(scaled(2, 20)):
        start = threading.Barrier(AT_ONCE)
        threads = [
            threading.Thread(target=streamed_request, args=(gateway.url, ledger, start, refusals))
            for _ in range(AT_ONCE)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a request hung"
    slow = [s for s in refusals if s > REFUSAL_BOUND]
    ledger.notes.update(
        limit=LIMIT,
        at_once=AT_ONCE,
        slowest_refusal=round(max(refusals, default=0), 3),
        refusals_over_bound=len(slow),
    )
    assert ledger.lost == 0, ledger.errors
    assert not slow, f"refusals slower than {REFUSAL_BOUND}s: {sorted(slow)[-5:]}"
    assert set(ledger.errors) <= {"503 overloaded"}, ledger.errors
    assert ledger.completed >= scaled(2, 20)  # at least one admitted per wave
    # nothing left in flight, and the gateway serves as before
    wait_until(
        lambda: metric(gateway.url, "pagedserve_gateway_requests_in_flight") == 0,
        10,
        what="no request in flight",
    )
    assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200
    completion(gateway.url)
    control_stack.healthy()
