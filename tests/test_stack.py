"""Ctrl-C leaves nothing behind: `pagedserve demo` stopped with Ctrl-C (SIGINT), or killed with
SIGKILL, leaves none of its processes running and none of its ports taken.

The demo tests run the real `pagedserve demo`, on free ports and a throwaway cache: that is
what a user starts and stops, and their signals go through the demo's own handling as well as
the stack's. A LocalStack of tiny models would save little: most of a start is five
interpreters importing torch, FastAPI and Gradio, which tiny models pay too, while the demo's
models cost nothing here (SmolLM2 comes from the cache the GGUF tests fill, the random Llama is
the session's `small_llama`). Each demo test takes half a minute to a minute on two cores.

The stop's own rules (one deadline for all services, a second Ctrl-C kills at once) need
services that outlast a SIGTERM, which the demo's do not: those tests use small stubborn
processes and take seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from processes import Proc, descendants, still_alive_after
from servers import free_port, wait_until

from pagedserve.deploy.stack import LocalStack, Service

PORTS = ["controller", "gateway", "ui", "worker0", "worker1"]  # PAGEDSERVE_<NAME>_PORT
SERVICES = 5  # the controller, a worker per model, the gateway and the arena

# Outlasts SIGTERM (it says so in its log) for two minutes, or until killed.
STUBBORN = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: print('SIGTERM', flush=True))\n"
    "print('up', flush=True)\n"
    "time.sleep(120)\n"
)


# -- ports -------------------------------------------------------------------------------------


def taken(ports: list[int]) -> list[int]:
    """Those of `ports` that a server could not bind on 127.0.0.1 now."""
    busy = []
    for port in ports:
        with socket.socket() as s:
            # as servers bind: connections of the old ones left in TIME_WAIT do not count
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


# -- the demo -----------------------------------------------------------------------------------


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    ports: list[int]
    out: Path
    started: list[Proc] = field(default_factory=list)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_serving(self, timeout: float = 300.0) -> list[Proc]:
        """Until the demo prints its addresses (every service ready); then its processes."""

        def serving() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the demo exited with {self.process.returncode}:\n{self.output()}"
                )
            return "arena (web UI):" in self.output()

        wait_until(serving, timeout, interval=0.5, what="the demo's addresses")
        self.started = descendants(self.process.pid)
        services = [p for p in self.started if "pagedserve.deploy.cli" in p.cmd]
        assert len(services) == SERVICES, services
        assert taken(self.ports) == self.ports, "a service is not listening where it was told"
        return self.started


def _sigint_default() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python keeps it ignored: the
    # demo must hear Ctrl-C as it does in a terminal, whatever started these tests.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def demo(tmp_path: Path, smollm2_path: Path, small_llama: Path) -> Iterator[Demo]:
    """`pagedserve demo` started on free ports with its models already in its cache."""
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    (models / smollm2_path.name).symlink_to(smollm2_path)
    (models / "tiny-llama").symlink_to(small_llama)  # what the demo would build: llama/small
    ports = {name: free_port() for name in PORTS}
    env = {
        **os.environ,
        "PAGEDSERVE_CACHE": str(tmp_path / "cache"),
        "PYTHONUNBUFFERED": "1",
        **{f"PAGEDSERVE_{name.upper()}_PORT": str(port) for name, port in ports.items()},
    }
    out = tmp_path / "demo.out"
    with out.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.deploy.cli", "demo"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            preexec_fn=_sigint_default,
        )
    running = Demo(process, list(ports.values()), out)
    try:
        yield running
    finally:
        left = descendants(process.pid) if process.poll() is None else []
        process.kill()
        process.wait(timeout=30)
        for p in left + running.started:
            p.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_every_service_and_frees_every_port(demo: Demo, sig) -> None:
    started = demo.wait_serving()
    demo.process.send_signal(sig)
    # The stack gives its services 15 s together; then the demo exits, having reaped them.
    assert demo.process.wait(timeout=60) == 0, demo.output()
    assert "stopping" in demo.output()
    assert not still_alive_after(started, 10), f"a process outlived the demo's {sig.name}"
    assert not taken(demo.ports)


def test_services_die_with_the_demo_when_it_is_killed(demo: Demo) -> None:
    started = demo.wait_serving()
    demo.process.kill()  # kill -9: no stop runs, the kernel tells the services
    demo.process.wait(timeout=10)
    assert not still_alive_after(started, 30), "a process outlived the demo's SIGKILL"
    assert not taken(demo.ports)


# -- the stop's rules, on stubborn services --------------------------------------------------------


def _stubborn(log_dir: Path, i: int) -> Service:
    argv = [sys.executable, "-c", STUBBORN]
    return Service(f"stubborn-{i}", argv, ready_url="", log_path=log_dir / f"stubborn-{i}.log")


def _said(service: Service, word: str) -> bool:
    return word in service.log_path.read_text()


def test_stop_signals_every_service_at_once_and_kills_after_one_deadline(tmp_path: Path) -> None:
    stack = LocalStack(log_dir=tmp_path)
    services = [stack.start(_stubborn(tmp_path, i)) for i in range(3)]
    try:
        wait_until(lambda: all(_said(s, "up") for s in services), 30, what="stubborn services up")
        begin = time.monotonic()
        stack.stop(timeout=2.0)
        took = time.monotonic() - begin
    finally:
        for s in services:
            s.kill()
    assert all(_said(s, "SIGTERM") for s in services)
    assert not any(s.alive() for s in services)
    assert 2.0 <= took < 4.0, f"{took:.1f}s: one 2 s deadline for all three, not one each"


# The demo's shape: serve until Ctrl-C, then stop the stack (with a deadline longer than the
# test is willing to wait).
DRIVER = f"""
import sys, time
from pathlib import Path
from pagedserve.deploy.stack import LocalStack, Service

log_dir = Path(sys.argv[1])
stack = LocalStack(log_dir=log_dir)
for i in range(3):
    argv = [sys.executable, "-c", {STUBBORN!r}]
    stack.start(Service(f"stubborn-{{i}}", argv, "", log_dir / f"stubborn-{{i}}.log"))
print(" ".join(str(s.process.pid) for s in stack.services), flush=True)
try:
    while True:
        time.sleep(1)
except KeyboardInterrupt:
    print("stopping", flush=True)
finally:
    stack.stop(timeout=300)
"""


def test_a_second_ctrl_c_during_the_stop_kills_every_service_at_once(tmp_path: Path) -> None:
    out = tmp_path / "driver.out"
    with out.open("wb") as log:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(tmp_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_sigint_default,
        )
    services: list[Proc] = []
    try:
        pids = wait_until(lambda: out.read_text().split("\n", 1)[0].split(), 30, what="pids")
        services = [p for p in descendants(driver.pid) if str(p.pid) in pids]
        assert len(services) == 3, (pids, services)
        logs = [tmp_path / f"stubborn-{i}.log" for i in range(3)]
        wait_until(lambda: all("up" in f.read_text() for f in logs), 30, what="stubborn up")

        driver.send_signal(signal.SIGINT)
        # All three hear SIGTERM at once, long before any deadline.
        wait_until(lambda: all("SIGTERM" in f.read_text() for f in logs), 10, what="SIGTERMs")
        assert all(p.alive() for p in services)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=10) == -signal.SIGINT, out.read_text()  # it went on up
        assert not still_alive_after(services, 10), "a service outlived the second Ctrl-C"
    finally:
        driver.kill()
        driver.wait(timeout=10)
        for p in services:
            p.kill()


def test_a_service_never_imports_from_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """A folder in the directory the stack runs from cannot hide an installed package from a
    service, though `python -m` and `-c` put that directory first on the path."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("raise ImportError('the wrong kernels')\n")
    monkeypatch.chdir(tmp_path)
    code = "import kernels; print(kernels.__file__)"
    service = Service("probe", [sys.executable, "-c", code], "", tmp_path / "probe.log")
    service.start()
    assert service.wait(60) and service.process.returncode == 0, service.log_path.read_text()
    assert "site-packages" in service.log_path.read_text()
