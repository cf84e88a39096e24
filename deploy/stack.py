"""Run the whole pagedserve stack as local processes: controller, one worker per model,
gateway, arena. `make demo` uses it; so can anyone who wants the stack on one machine."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass
class Service:
    """One process of the stack, in its own session and process group.

    Its own session keeps the terminal's Ctrl-C from reaching it, so that whoever runs the
    stack decides when and how it stops; its own group lets one kill reach whatever it started.
    Neither helps when that runner dies without stopping it (kill -9, a crash): no signal can
    come from a dead process, so on Linux the kernel is asked to send one (die_with_parent).

    It never imports from the working directory (PYTHONSAFEPATH, Python 3.11+): `python -m`
    would otherwise put it first on the path, where a folder of the user's could hide an
    installed package (as a `kernels/` folder hid the one `transformers` imports)."""

    name: str
    argv: list[str]
    ready_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
                env={**os.environ, **self.env, "PYTHONSAFEPATH": "1"},
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """SIGTERM, without waiting: the service stops its own way (a worker drains first)."""
        if self.alive():
            self.process.terminate()

    def kill(self) -> None:
        """SIGKILL to the service and to whatever it started in its group, without waiting."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left of it
                os.killpg(self.process.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the service has exited (and been reaped) within `timeout` seconds."""
        if self.process is None:
            return True
        try:
            self.process.wait(None if timeout is None else max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        return True


@dataclass
class LocalStack:
    host: str = "127.0.0.1"
    controller_port: int = 21001
    gateway_port: int = 8000
    ui_port: int = 7860
    log_dir: Path = field(default_factory=lambda: Path("logs"))
    services: list[Service] = field(default_factory=list)

    @property
    def controller_url(self) -> str:
        return f"http://{self.host}:{self.controller_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.ui_port}"

    def _launch(self, name: str, args: list[str], ready_url: str, port: int) -> Service:
        _require_free(self.host, port, name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "pagedserve.deploy.cli", *args]
        return self.start(Service(name, argv, ready_url, self.log_dir / f"{name}.log"))

    def start(self, service: Service) -> Service:
        """Start any service as part of the stack: stop() stops it with the others."""
        self.services.append(service)  # first: an interrupt during the start still finds it
        service.start()
        return service

    def start_controller(self) -> Service:
        args = ["controller", "--host", self.host, "--port", str(self.controller_port)]
        return self._launch(
            "controller", args, f"{self.controller_url}/health", self.controller_port
        )

    def start_worker(self, name: str, model_path: Path, port: int, *engine_args: str) -> Service:
        args = ["worker", "--model-path", str(model_path), "--model-names", name, "--host", self.host,
                "--port", str(port), "--controller-address", self.controller_url, *engine_args]  # fmt: skip
        return self._launch(f"worker-{name}", args, f"http://{self.host}:{port}/ready", port)

    def start_gateway(self) -> Service:
        args = ["gateway", "--host", self.host, "--port", str(self.gateway_port),
                "--controller-address", self.controller_url]  # fmt: skip
        return self._launch("gateway", args, f"{self.gateway_url}/health", self.gateway_port)

    def start_ui(self, *ui_args: str) -> Service:
        args = [
            "ui",
            "--gateway-url",
            self.gateway_url,
            "--host",
            self.host,
            "--port",
            str(self.ui_port),
            *ui_args,
        ]
        return self._launch("ui", args, self.ui_url, self.ui_port)

    def wait_ready(self, service: Service, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not service.alive():
                raise RuntimeError(f"{service.name} exited; see {service.log_path}")
            try:
                if httpx.get(service.ready_url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"{service.name} not ready within {timeout:.0f}s; see {service.log_path}"
        )

    def wait_models(self, names: list[str], timeout: float) -> None:
        """Until the gateway lists every model (workers registered and ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                listed = {
                    m["id"]
                    for m in httpx.get(f"{self.gateway_url}/v1/models", timeout=2.0).json()["data"]
                }
                if set(names) <= listed:
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the gateway did not list {names} within {timeout:.0f}s")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to every service at once, SIGKILL to those still running `timeout` seconds
        later: one deadline for the whole stack, not one per service. An interrupt while
        waiting (an impatient second Ctrl-C) kills them all at once, then goes on up."""
        try:
            for service in self.services:
                service.terminate()
            deadline = time.monotonic() + timeout
            for service in self.services:
                service.wait(deadline - time.monotonic())
        except KeyboardInterrupt:
            logger.warning("interrupted while stopping: killing the services still running")
            raise
        finally:
            for service in self.services:  # every kill first: nothing waits before all are sent
                service.kill()
            for service in self.services:
                service.wait()
            self.services.clear()


def _require_free(host: str, port: int, name: str) -> None:
    with socket.socket() as s:
        if s.connect_ex((host, port)) == 0:
            raise RuntimeError(
                f"port {port} for the {name} is taken; stop what runs there or set "
                f"PAGEDSERVE_{name.split('-')[0].upper()}_PORT"
            )


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when this process dies, however it dies
    (PR_SET_PDEATHSIG); None elsewhere. SIGTERM rather than SIGKILL: each service then stops
    its own way and takes its own children (a worker's Ray ranks) along.

    Linux sends it when the *thread* that started the child ends, not the process: start
    services from a thread that lives as long as the stack (the main one)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None).prctl  # looked up here: the forked child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before the request took hold
            os._exit(1)

    return preexec


def env_port(name: str, default: int) -> int:
    return int(os.environ.get(f"PAGEDSERVE_{name.upper()}_PORT", default))
