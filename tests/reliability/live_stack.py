"""The real stack for the worker-fault scenarios, and a client that never hangs.

`stack()` starts a controller, tiny-model workers and (optionally) the gateway on loopback
ports and always tears them down. `stream_all()` runs many streamed OpenAI requests at once,
each under its own deadline, and `Outcome.verdict()` sorts each into a whole answer, a clear
error (an HTTP error status, or an error event before [DONE]) or a loss (hung, cut off, or
wrong text). `engine_idle()` waits until a worker holds no request and no KV block.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from servers import (
    ServerProcess,
    controller_process,
    gateway_process,
    metric,
    start_all,
    wait_until,
    worker_process,
)

# A tiny-model worker's engine in these scenarios: a small KV cache (the 1 GiB default would
# dominate every memory figure) and room for prompts of a few dozen tokens.
ENGINE = {"kv_cache_memory": 32 << 20, "max_model_len": 512}
# The controller forgets a worker whose heartbeats (every 0.5 s) stop for this long.
EXPIRY = 3.0


@dataclass
class Stack:
    controller: ServerProcess | None
    workers: list[ServerProcess]
    gateway: ServerProcess | None
    started_in: float = 0.0  # seconds the stack took to start

    @property
    def url(self) -> str:
        """Where clients send requests: the gateway, else the only worker."""
        return self.gateway.url if self.gateway is not None else self.workers[0].url

    def registered(self) -> dict[str, dict]:
        """The controller's workers by address."""
        assert self.controller is not None
        r = httpx.get(self.controller.url + "/workers", timeout=5)
        return {w["worker_name"]: w for w in r.json()["workers"]}

    def workers_by_id(self) -> dict[str, ServerProcess]:
        """Each worker process by the id it registered with (the route header names it)."""
        ids = {address: info["worker_id"] for address, info in self.registered().items()}
        return {ids[w.url]: w for w in self.workers}


@contextlib.contextmanager
def stack(
    model: Path,
    log_dir: Path,
    *,
    workers: int = 1,
    controller: bool = True,
    gateway: bool = True,
    engine: dict | None = None,
    worker_options: dict | None = None,
) -> Iterator[Stack]:
    """Workers serving `model` as "tiny"; with a controller (heartbeats every 0.5 s, expiry
    after EXPIRY) and a gateway in front unless told otherwise."""
    began = time.monotonic()
    ctl = None
    if controller:
        ctl = controller_process(
            log_dir, heartbeat_expiration=EXPIRY, health_check_interval=0.5
        ).start()
    procs: list[ServerProcess] = []
    gw: ServerProcess | None = None
    try:
        procs = [
            worker_process(
                log_dir,
                model,
                ctl.url if ctl else None,
                model_names="tiny",
                heartbeat_interval=0.5,
                cpu_threads=1,
                **(engine or ENGINE),
                **(worker_options or {}),
            )
            for _ in range(workers)
        ]
        if gateway:
            assert ctl is not None, "the gateway finds its workers through the controller"
            gw = gateway_process(log_dir, ctl.url, routing_refresh_interval=0.5)
        start_all(*procs, *([gw] if gw else []), timeout=120)
        s = Stack(ctl, procs, gw)
        if ctl is not None:
            wait_until(lambda: len(s.registered()) == workers, 30, what="workers registered")
        if gw is not None:  # the gateway lists the model, then learns every worker
            wait_until(
                lambda: httpx.get(gw.url + "/v1/models", timeout=5).json()["data"],
                30,
                what="the gateway lists the model",
            )
            time.sleep(1.5)  # three routing refreshes: every registered worker is in its table
        s.started_in = round(time.monotonic() - began, 1)
        yield s
    finally:
        for p in (*([gw] if gw else []), *procs):
            p.stop()
        if ctl is not None:
            ctl.stop()


# -- the client ---------------------------------------------------------------------------------


def completion(i: int, tokens: int, n: int = 1) -> dict:
    """Request i: a greedy streamed completion of exactly `tokens` tokens per choice (n > 1:
    a stream the gateway cannot resume on another worker)."""
    return {
        "model": "tiny",
        "prompt": f"Request number {i} tells the story of",
        "n": n,
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class Outcome:
    index: int
    body: dict
    status: int | None = None
    route: str = ""  # the gateway's x-pagedserve-route header (names the worker)
    texts: dict[int, str] = field(default_factory=dict)  # by choice
    events: int = 0
    finish: str | None = None
    tokens: int | None = None  # usage.completion_tokens
    done: bool = False  # data: [DONE] came
    error: str | None = None  # the code of an error event, or "http_<status>"
    failure: str | None = None  # hung (deadline), or the connection broke without a word
    disconnected: bool = False  # the client went away on purpose
    started_at: float | None = None  # when the first event came (monotonic)
    ended_at: float | None = None  # when [DONE] came

    @property
    def text(self) -> str:
        return "\n--\n".join(self.texts[i] for i in sorted(self.texts))

    @property
    def worker_id(self) -> str:
        return self.route.split("worker=")[1].split(";")[0] if "worker=" in self.route else ""

    def verdict(self, expected: str | None = None) -> tuple[str, str]:
        """("complete", ""), ("error", kind) or ("lost", kind). A whole answer has [DONE], a
        finish reason, max_tokens tokens and, when `expected` is given, exactly that text."""
        if self.failure is not None:
            return "lost", self.failure
        if self.error is not None:
            return "error", self.error
        if not self.done or self.finish is None:
            return "lost", "truncated"
        if self.tokens != self.body["max_tokens"] * self.body["n"] or self.finish != "length":
            return "lost", f"short answer ({self.tokens} tokens, {self.finish})"
        if expected is not None and self.text != expected:
            return "lost", "wrong text"
        return "complete", ""


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    out: Outcome,
    deadline: float,
    leave_after: int | None,
) -> None:
    async def run() -> None:
        async with client.stream("POST", url + "/v1/completions", json=out.body) as r:
            out.status = r.status_code
            out.route = r.headers.get("x-pagedserve-route", "")
            if r.status_code != 200:
                await r.aread()
                out.error = f"http_{r.status_code}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.done, out.ended_at = True, time.monotonic()
                    continue
                chunk = json.loads(line[6:])
                out.events += 1
                out.started_at = out.started_at or time.monotonic()
                if "error" in chunk:
                    out.error = "event_" + str(chunk["error"].get("code") or "error")
                    continue
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    i = choice["index"]
                    out.texts[i] = out.texts.get(i, "") + (choice.get("text") or "")
                    out.finish = choice.get("finish_reason") or out.finish
                if leave_after is not None and out.events >= leave_after:
                    out.disconnected = True
                    return  # leaving the block closes the connection mid-stream

    try:
        await asyncio.wait_for(run(), deadline)
    except asyncio.TimeoutError:
        out.failure = "hung"
    except httpx.HTTPError as e:
        out.failure = f"broken ({type(e).__name__})"


def stream_all(
    url: str,
    bodies: list[dict],
    *,
    deadline: float = 120.0,
    leave_after: dict[int, int] | None = None,
    held: set[int] = frozenset(),
    during: Callable[[list[Outcome]], None] | None = None,
) -> list[Outcome]:
    """Stream every body at once, each under `deadline`; client i leaves after
    `leave_after[i]` events. `during(outcomes)` runs in a thread meanwhile (to break
    something), seeing the outcomes fill in; the bodies in `held` are sent once it returns."""
    outcomes = [Outcome(i, b) for i, b in enumerate(bodies)]

    async def main() -> None:
        limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=0)
        timeout = httpx.Timeout(deadline, connect=10.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

            def send(o: Outcome) -> asyncio.Task[None]:
                leave = (leave_after or {}).get(o.index)
                return asyncio.create_task(_stream(client, url, o, deadline, leave))

            tasks = [send(o) for o in outcomes if o.index not in held]
            if during is not None:
                await asyncio.to_thread(during, outcomes)
            tasks += [send(o) for o in outcomes if o.index in held]
            await asyncio.gather(*tasks)

    asyncio.run(main())
    return outcomes


def served_alone(url: str, bodies: list[dict], deadline: float = 60.0) -> list[str]:
    """The text of each body served on its own, one after the other (the reference)."""
    texts = []
    for body in bodies:
        (o,) = stream_all(url, [body], deadline=deadline)
        assert o.verdict() == ("complete", ""), (o.verdict(), o)
        texts.append(o.text)
    return texts


def account(ledger, outcomes: list[Outcome], expected: list[str | None] | None = None) -> None:  # noqa: ANN001
    """Enter every outcome in the ledger (sent already counted by the caller)."""
    for o in outcomes:
        kind, what = o.verdict(expected[o.index] if expected else None)
        if kind == "complete":
            ledger.complete()
        elif kind == "error":
            ledger.error(what)
        else:
            ledger.lose(what)


# -- what a worker holds ------------------------------------------------------------------------


def engine_load(worker_url: str) -> dict[str, float]:
    names = {
        "running": "pagedserve_worker_requests_running",
        "waiting": "pagedserve_worker_requests_waiting",
        "blocks_used": "pagedserve_worker_kv_blocks_used",
        "kv_usage": "pagedserve_worker_kv_cache_usage",
    }
    return {k: metric(worker_url, name) for k, name in names.items()}


def engine_idle(worker_url: str, timeout: float = 30.0) -> dict[str, float]:
    """Wait until the worker's engine runs nothing, queues nothing and holds no KV block;
    return what it holds then (or at the timeout, for the caller's assertion to show)."""
    deadline = time.monotonic() + timeout
    while any((load := engine_load(worker_url)).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return load


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak since the process began) of `pid`, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


@dataclass
class Peak:
    """Samples a process's RSS every `interval` s in a thread while in a `with` block."""

    pid: int
    interval: float = 0.05
    peak_kib: int = 0
    _stop: bool = field(default=False, repr=False)

    def __enter__(self) -> Peak:
        def sample() -> None:
            while not self._stop:
                with contextlib.suppress(OSError):
                    self.peak_kib = max(self.peak_kib, rss_kib(self.pid)["VmRSS"])
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(5)
