"""Where a supervisor's workers run: one interface, local processes behind it here and Ray
actors in `ray_replicas.py`.

A `Launcher` starts one worker process (`pagedserve worker ...`) for a `WorkerLaunch` and
hands back a `Replica`: a handle that says whether the process still runs, and stops it. The
supervisor never cares where the process runs; it talks to the worker over HTTP at
`replica.address` like everyone else.
"""

from __future__ import annotations

import socket
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from pagedserve.deploy.stack import Service


@dataclass
class WorkerLaunch:
    """One worker to start: `pagedserve worker` with `args`, plus what the launcher decides
    itself (--host, --port, --worker-address, --worker-id)."""

    replica_id: str
    model_name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)  # the control token travels here, not in argv
    tensor_parallel_size: int = 1
    gpu: bool = False  # placed on GPUs (one per rank) rather than CPUs


class Replica(ABC):
    """A running (or finished) worker process."""

    replica_id: str
    model_name: str
    address: str  # http://host:port, the URL the worker registers
    node: str  # the machine it runs on, as its launcher names machines

    @abstractmethod
    def poll(self) -> int | None:
        """None while it runs; its exit status once it has stopped (-1 when the machine it ran
        on is gone, so no status is known). May block briefly; never raises."""

    @abstractmethod
    def terminate(self) -> None:
        """SIGTERM: the worker drains (requests in flight finish), leaves the registry, exits."""

    @abstractmethod
    def kill(self) -> None:
        """SIGKILL to the worker and whatever it started."""

    @abstractmethod
    def wait(self, timeout: float) -> bool:
        """Whether it has stopped within `timeout` seconds."""


class Launcher(ABC):
    kind: str  # "local" or "ray": shown by `pagedserve status`

    @abstractmethod
    def launch(self, launch: WorkerLaunch) -> Replica:
        """Start one worker; raise LaunchError when it cannot even start (no room, no node)."""

    @abstractmethod
    def release(self, replica: Replica) -> None:
        """The replica has stopped for good: what it held (a port, a placement) may be reused."""

    @abstractmethod
    def close(self) -> None:
        """Release what the launcher holds (a Ray connection); replicas are stopped first."""


class LaunchError(RuntimeError):
    pass


class LocalReplica(Replica):
    def __init__(self, launch: WorkerLaunch, service: Service, address: str) -> None:
        self.replica_id = launch.replica_id
        self.model_name = launch.model_name
        self.address = address
        self.node = "local"
        self.service = service

    @property
    def pid(self) -> int | None:
        return None if self.service.process is None else self.service.process.pid

    def poll(self) -> int | None:
        return None if self.service.process is None else self.service.process.poll()

    def terminate(self) -> None:
        self.service.terminate()

    def kill(self) -> None:
        self.service.kill()

    def wait(self, timeout: float) -> bool:
        return self.service.wait(timeout)


class LocalLauncher(Launcher):
    """Workers as child processes of this one (each in its own process group, dying with it).

    Start them from the thread that lives as long as they do (Service's parent-death signal
    is tied to the starting thread)."""

    kind = "local"

    def __init__(self, host: str, base_port: int, log_dir: Path) -> None:
        self.host = host
        self.base_port = base_port
        self.log_dir = log_dir
        self._taken: set[int] = set()
        self._last_port: dict[str, int] = {}  # a restarted replica keeps its address if it can

    def launch(self, launch: WorkerLaunch) -> Replica:
        port = self._free_port(self._last_port.get(launch.replica_id))
        self._last_port[launch.replica_id] = port
        address = f"http://{self.host}:{port}"
        argv = [sys.executable, "-m", "pagedserve.deploy.cli", "worker", *launch.args,
                "--host", self.host, "--port", str(port), "--worker-id", launch.replica_id]  # fmt: skip
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"worker-{launch.replica_id}.log"
        service = Service(launch.replica_id, argv, f"{address}/ready", log, env=launch.env)
        service.start()
        return LocalReplica(launch, service, address)

    def release(self, replica: Replica) -> None:
        self._taken.discard(int(replica.address.rsplit(":", 1)[1]))

    def close(self) -> None:
        pass  # nothing held beyond the replicas

    def _free_port(self, preferred: int | None) -> int:
        if (
            preferred is not None
            and preferred not in self._taken
            and bindable(self.host, preferred)
        ):
            self._taken.add(preferred)
            return preferred
        port = self.base_port
        while port in self._taken or not bindable(self.host, port):
            port += 1
            if port > 65535:
                raise LaunchError(f"no free port from {self.base_port} up on {self.host}")
        self._taken.add(port)
        return port


def bindable(host: str, port: int) -> bool:
    """Whether a server could listen there now (with SO_REUSEADDR, as uvicorn does: a port
    whose last connections linger in TIME_WAIT is free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
