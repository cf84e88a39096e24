"""Hostile clients on every public port (gateway, controller, worker, arena UI): slow-loris
clients that send their headers a byte at a time are cut off by the header timeout, a client
that connects and says nothing too, and a 10 MB body is refused (413, or the connection closed)
without the process holding it; meanwhile a health probe answers fast throughout."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from control_stack import HEADER_TIMEOUT, ControlStack, rss_bytes
from ledger import Ledger, scaled
from servers import ServerProcess, ui_process

BODY = 10 * 1000 * 1000
CUT_OFF_BOUND = HEADER_TIMEOUT + 3.0  # seconds until a slow client must be gone
PROBE_BOUND = 1.0  # seconds a health probe may take meanwhile
BODY_ROUTES = {
    "gateway": "/v1/chat/completions",
    "controller": "/register_worker",
    "worker": "/v1/chat/completions",
    "ui": "/gradio_api/queue/join",
}


@pytest.fixture(scope="module")
def arena(
    control_stack: ControlStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("arena")
    ui = ui_process(
        log_dir,
        control_stack.gateway.url,
        db=log_dir / "arena.db",
        header_timeout=HEADER_TIMEOUT,
    )
    with ui.start(timeout=120):
        yield ui


def target(service: str, stack: ControlStack, request: pytest.FixtureRequest) -> ServerProcess:
    if service == "ui":
        return request.getfixturevalue("arena")
    return {"gateway": stack.gateway, "controller": stack.controller, "worker": stack.workers[0]}[
        service
    ]


class Prober:
    """Health probes every 0.2 s in a thread; the slowest one and any failure are kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.slowest = 0.0
        self.failures: list[str] = []
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                r = httpx.get(self.url + "/health", timeout=10)
                if r.status_code != 200:
                    self.failures.append(f"status {r.status_code}")
            except httpx.HTTPError as e:
                self.failures.append(repr(e))
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.count += 1
            self._stop.wait(0.2)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def slow_loris(port: int, drip: bytes, interval: float, give_up: float) -> float | None:
    """Send `drip` a byte every `interval` s (nothing at all if empty); the seconds until the
    server closed the connection, or None if it was still open after `give_up` s."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=give_up) as s:
        s.settimeout(interval)
        i = 0
        while time.monotonic() - started < give_up:
            try:
                if drip:
                    s.sendall(drip[i % len(drip) : i % len(drip) + 1])
                    i += 1
                if s.recv(4096) == b"":
                    return time.monotonic() - started
                # a 408 (or any answer) then the close
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return time.monotonic() - started
    return None


def big_body(port: int, path: str, chunked: bool) -> tuple[str, bool]:
    """POST 10 MB of JSON-ish bytes; ("413"|"closed"|"status N", whether it was all sent)."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {BODY}\r\n\r\n"
    piece = b"[" + b"0," * (32 * 1024) + b"0]"
    sent_all = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(head.encode())
            sent = 0
            while sent < BODY:
                chunk = piece[: BODY - sent]
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
            if chunked:
                s.sendall(b"0\r\n\r\n")
            sent_all = True
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass
        try:
            answer = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            return "closed", sent_all
    if not answer:
        return "closed", sent_all
    status = answer.split(b" ", 2)[1].decode()
    return ("413" if status == "413" else f"status {status}"), sent_all


def in_threads(work: Callable[[], None], n: int) -> None:
    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a client thread hung"


@pytest.mark.parametrize("service", ["gateway", "controller", "worker", "ui"])
def test_slow_clients_and_large_bodies(
    control_stack: ControlStack, ledger: Ledger, service: str, request: pytest.FixtureRequest
) -> None:
    server = target(service, control_stack, request)
    lorises = scaled(6, 60)
    header = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4096
    cut_after: list[float] = []

    def loris(drip: bytes) -> Callable[[], None]:
        def run() -> None:
            ledger.send()
            seconds = slow_loris(server.port, drip, 0.1, give_up=CUT_OFF_BOUND + 10)
            if seconds is None or seconds > CUT_OFF_BOUND:
                ledger.lose(f"slow client not cut off ({seconds})")
            else:
                ledger.error("slow client cut off")
                cut_after.append(seconds)

        return run

    rss_before = rss_bytes(server)
    bodies: list[str] = []
    with Prober(server.url) as prober:
        in_threads(loris(header), lorises)
        in_threads(loris(b""), max(1, lorises // 3))  # connects and says nothing
        for chunked in [False, True] * scaled(1, 5):
            ledger.send()
            outcome, sent_all = big_body(server.port, BODY_ROUTES[service], chunked)
            bodies.append(f"{'chunked' if chunked else 'length'}: {outcome}")
            if outcome in ("413", "closed"):
                ledger.error(f"10 MB body: {outcome}")
            else:
                ledger.lose(f"10 MB body answered {outcome}")
    growth = rss_bytes(server) - rss_before
    ledger.notes.update(
        service=service,
        cut_off_after_max=round(max(cut_after, default=0), 2),
        probes=prober.count,
        slowest_probe=round(prober.slowest, 3),
        bodies=bodies,
        rss_growth_mb=round(growth / 1e6, 1),
    )
    assert ledger.lost == 0, ledger.errors
    assert not prober.failures and prober.slowest < PROBE_BOUND, (
        prober.failures[:3],
        prober.slowest,
    )
    assert growth < BODY * 0.8, f"{service} grew by {growth / 1e6:.1f} MB: it held the body"
    assert server.alive
    control_stack.healthy()
    if service == "ui":
        assert httpx.get(server.url + "/", timeout=10).status_code == 200
