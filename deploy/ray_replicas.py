"""Workers on a Ray cluster: each replica is one Ray actor that owns one `pagedserve worker`
process on the actor's node.

Ray places, reserves and watches; it carries no traffic. The actor reserves the worker's
resources (`cpus_per_worker` CPUs, or `gpus_per_rank` GPUs when the model runs on GPUs), picks
a free port on its node and starts the process there, in its own session and tied to the
actor's life (Linux's parent-death signal): when Ray kills the actor, or its node goes, the
process goes too. The launcher asks the actor how the process is; an actor that no longer
answers is a replica whose machine is gone (poll() == -1).

Tensor parallelism: a worker with N ranks gets one placement group of N equal bundles
(`placement_strategy`, STRICT_PACK by default). The actor, and so rank 0 in its process, sits
in bundle 0; the worker's engine finds the group through `PAGEDSERVE_PLACEMENT_GROUP` and puts
ranks 1..N-1 in bundles 1..N-1 (engine/executor.py), so the group's resources are counted once.
A worker of one rank needs no group: its actor is spread over the nodes (SPREAD).

The supervisor's process is the Ray driver: actors and groups belong to it, and Ray removes
them if it dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pagedserve.deploy.replicas import Launcher, LaunchError, Replica, WorkerLaunch
from pagedserve.deploy.stack import die_with_parent

if TYPE_CHECKING:  # the actors import this module: no torch for them (stack_config has it)
    from pagedserve.deploy.stack_config import RaySection

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT = 3.0  # seconds for a cluster address to answer (Ray itself retries a minute)
_PLACE_TIMEOUT = 30.0  # seconds for Ray to place a worker's actor (or its group)
_CALL_TIMEOUT = 5.0  # seconds an actor has to answer a poll
# Set in Ray's own workers for Ray's own use; a process they start that joins the cluster as
# a driver of its own must not carry them (Ray strips them from submitted jobs too).
_RAY_INTERNAL_ENV = ("RAY_JOB_ID", "RAY_RAYLET_PID")
PLACEMENT_GROUP_ENV = "PAGEDSERVE_PLACEMENT_GROUP"  # as engine/executor.py reads it


class WorkerProcess:
    """The Ray actor: one `pagedserve worker` process on this node. Its methods run on the
    actor's one thread, the thread that started the process, so the parent-death signal
    holds as long as the actor lives; none of them blocks for long."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def start(self, launch: WorkerLaunch, log_dir: str, cluster: str, group: str | None) -> dict:
        import ray

        host = ray.util.get_node_ip_address()
        port = _free_port(host)
        argv = [sys.executable, "-m", "pagedserve.deploy.cli", "worker", *launch.args,
                "--host", host, "--port", str(port), "--worker-id", launch.replica_id,
                "--ray-address", cluster]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in _RAY_INTERNAL_ENV}
        env.update(launch.env, PYTHONSAFEPATH="1")  # see deploy/stack.py's Service
        if group is not None:
            env[PLACEMENT_GROUP_ENV] = group
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        log_path = Path(log_dir) / f"worker-{launch.replica_id}.log"
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=die_with_parent(),
            )  # fmt: skip
        node_id = ray.get_runtime_context().get_node_id()
        return {"address": f"http://{host}:{port}", "node": node_id[:8], "pid": self.process.pid,
                "log": str(log_path)}  # fmt: skip

    def poll(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def kill(self) -> int | None:
        """SIGKILL to the process's group (the worker and what it started); its status."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, 9)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(2.0)
        return self.process.poll()


class RayReplica(Replica):
    def __init__(self, launch: WorkerLaunch, actor, group, started: dict) -> None:
        self.replica_id = launch.replica_id
        self.model_name = launch.model_name
        self.address = started["address"]
        self.node = started["node"]
        self.pid = started["pid"]  # on its node
        self.log_path = started["log"]  # on its node
        self.actor = actor
        self.group = group  # the placement group, or None for one rank
        self._status: int | None = None  # once known, final

    def poll(self) -> int | None:
        if self._status is not None:
            return self._status
        import ray

        try:
            self._status = ray.get(self.actor.poll.remote(), timeout=_CALL_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            return None  # busy, or its node is going: the next poll tells
        except Exception:  # RayActorError, ActorDiedError, ActorUnavailableError, node gone
            self._status = -1
        return self._status

    def terminate(self) -> None:
        if self._status is None:
            with contextlib.suppress(Exception):
                self.actor.terminate.remote()  # not awaited: the worker drains its own way

    def kill(self) -> None:
        import ray

        if self._status is None:
            try:
                self._status = ray.get(self.actor.kill.remote(), timeout=_CALL_TIMEOUT)
            except Exception:
                self._status = -1
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        while self.poll() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return True


class RayLauncher(Launcher):
    """Workers as Ray actors' processes on the nodes of the cluster at `address`."""

    kind = "ray"

    def __init__(self, address: str, section: RaySection, log_dir: Path) -> None:
        self.section = section
        self.log_dir = Path(log_dir)
        self.ray = _connect(address)
        self._actor = self.ray.remote(WorkerProcess)
        # The address every node can reach the cluster at (not this host's name for it).
        self.cluster_address = self.ray.get_runtime_context().gcs_address

    def launch(self, launch: WorkerLaunch) -> Replica:
        ray = self.ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        rank = {"GPU": self.section.gpus_per_rank} if launch.gpu else {"CPU": self.section.cpus_per_worker}  # fmt: skip
        options = {"num_cpus": rank.get("CPU", 0), "num_gpus": rank.get("GPU", 0),
                   "name": f"pagedserve-worker-{launch.replica_id}", "max_restarts": 0}  # fmt: skip
        group = None
        if launch.tensor_parallel_size > 1:
            group = ray.util.placement_group(
                [rank] * launch.tensor_parallel_size, strategy=self.section.placement_strategy
            )
            try:
                ray.get(group.ready(), timeout=_PLACE_TIMEOUT)
            except ray.exceptions.GetTimeoutError:
                ray.util.remove_placement_group(group)
                raise LaunchError(
                    f"Ray could not place {launch.tensor_parallel_size} x {rank} "
                    f"({self.section.placement_strategy}) for {launch.replica_id} within "
                    f"{_PLACE_TIMEOUT:.0f}s; {_free(ray)}"
                ) from None
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, 0)
        else:
            options["scheduling_strategy"] = "SPREAD"
        actor = self._actor.options(**options).remote()
        args = (launch, str(self.log_dir), self.cluster_address, group and group.id.hex())
        try:
            started = ray.get(actor.start.remote(*args), timeout=_PLACE_TIMEOUT)
        except Exception as e:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            if group is not None:
                ray.util.remove_placement_group(group)
            if isinstance(e, ray.exceptions.GetTimeoutError):
                raise LaunchError(
                    f"Ray could not place {launch.replica_id} ({rank}) within "
                    f"{_PLACE_TIMEOUT:.0f}s; {_free(ray)}"
                ) from None
            raise LaunchError(f"could not start {launch.replica_id} on Ray: {e}") from e
        return RayReplica(launch, actor, group, started)

    def release(self, replica: Replica) -> None:
        assert isinstance(replica, RayReplica)
        with contextlib.suppress(Exception):
            self.ray.kill(replica.actor, no_restart=True)
        if replica.group is not None:
            with contextlib.suppress(Exception):
                self.ray.util.remove_placement_group(replica.group)

    def close(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()


def _connect(address: str):
    """ray.init(address), refused within seconds when nothing answers there: Ray itself
    retries for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"the Ray address must be HOST:PORT, got {address!r}")
    hint = f"no Ray cluster answers at {address}; start one with `ray start --head`"
    try:
        _check_grpc(host, int(port))
    except OSError as e:
        raise LaunchError(f"{hint} ({e.strerror or e})") from e
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls home
    import ray
    import ray.util.scheduling_strategies

    if ray.is_initialized():
        raise LaunchError("this process is connected to Ray already; one launcher a process")
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        auth = "" if "RAY_AUTH_MODE" in os.environ else (
            " (a cluster with token authentication needs RAY_AUTH_MODE=token here)"
        )  # fmt: skip
        raise LaunchError(f"{hint}: {_first_line(e)}{auth}") from e
    return ray


def _check_grpc(host: str, port: int) -> None:
    """Raise OSError unless an HTTP/2 (gRPC) server answers at host:port within seconds, as
    Ray's GCS does: it answers a client's connection preface with its SETTINGS frame."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
    with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT) as s:
        s.settimeout(_CONNECT_TIMEOUT)
        s.sendall(preface)
        try:
            frame = s.recv(9)
        except TimeoutError:
            raise OSError("it does not answer as a gRPC server does") from None
        if len(frame) < 9 or frame[3] != 4:  # frame type 4: SETTINGS
            raise OSError("it does not answer as a gRPC server does")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _free(ray) -> str:
    free, total = ray.available_resources(), ray.cluster_resources()
    kinds = [k for k in ("CPU", "GPU") if k in total]
    return "free: " + (
        ", ".join(f"{free.get(k, 0):g} of {total[k]:g} {k}" for k in kinds) or "nothing"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
