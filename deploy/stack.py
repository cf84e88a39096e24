"""Run the whole pagedserve stack as local processes: controller, one worker per model,
gateway, arena. `make demo` uses it; so can anyone who wants the stack on one machine."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)


@dataclass
class Service:
    name: str
    argv: list[str]
    ready_url: str
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


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
        service = Service(name, argv, ready_url, self.log_dir / f"{name}.log")
        service.start()
        self.services.append(service)
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

    def stop(self) -> None:
        for service in reversed(self.services):  # the UI and gateway first, the controller last
            service.stop()
        self.services.clear()


def _require_free(host: str, port: int, name: str) -> None:
    with socket.socket() as s:
        if s.connect_ex((host, port)) == 0:
            raise RuntimeError(
                f"port {port} for the {name} is taken; stop what runs there or set "
                f"PAGEDSERVE_{name.split('-')[0].upper()}_PORT"
            )


def env_port(name: str, default: int) -> int:
    return int(os.environ.get(f"PAGEDSERVE_{name.upper()}_PORT", default))
