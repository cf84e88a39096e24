"""A real two-node Ray cluster on this host, for the tests that place workers with Ray.

Two raylets run here: the head (`node_a`) and a second node (`node_b`), each `ray start
--block` in its own process group with 2 CPUs and a custom resource naming it, so a test can
tell where a worker landed and lose a whole node by killing its group. They authenticate as
the test process does (Ray 2.60's head turns token authentication on by default; see
test_tensor_parallel.py). Ray reports this host by its outward address, not 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from servers import free_port, wait_until

RAY = Path(sys.executable).parent / "ray"
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}  # fmt: skip


@dataclass
class Cluster:
    address: str  # 127.0.0.1:PORT, the head's
    node_b: subprocess.Popen  # its `ray start --block`: kill its group to lose the node


def ray_start(*args: str, log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own process group: killing the group is losing the node."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", *args],
            env={**os.environ, **RAY_ENV}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def stop_node(node: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM (ray start stops its daemons), SIGKILL to the group for what is left."""
    with contextlib.suppress(ProcessLookupError):
        node.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.pid, signal.SIGKILL)
    node.wait()


def kill_node(node: subprocess.Popen) -> None:
    """The whole node at once: raylet, object store, actors."""
    os.killpg(node.pid, signal.SIGKILL)


@contextlib.contextmanager
def two_node_cluster(logs: Path) -> Iterator[Cluster]:
    port = free_port()
    head = ray_start("--head", f"--port={port}", "--include-dashboard=false",
                     '--resources={"node_a": 1}', log=logs / "head.log")  # fmt: skip
    nodes = [head]
    try:
        wait_until(lambda: _answers(port) or head.poll() is not None, 60, what="the Ray head")
        assert head.poll() is None, (logs / "head.log").read_text()[-2000:]
        node_b = ray_start(f"--address=127.0.0.1:{port}", '--resources={"node_b": 1}',
                           log=logs / "node_b.log")  # fmt: skip
        nodes.append(node_b)
        _wait_for_nodes(f"127.0.0.1:{port}", 2, logs)
        yield Cluster(f"127.0.0.1:{port}", node_b)
    finally:
        for node in reversed(nodes):
            stop_node(node)
        marker = Path("/tmp/ray/ray_current_cluster")  # `ray start` leaves its address here
        if marker.is_file() and marker.read_text().strip().endswith(f":{port}"):
            marker.unlink()


def node_names(ray) -> dict[str, str]:
    """Short node name (as replicas give it) -> the custom resource it was started with."""
    names = {}
    for n in ray.nodes():
        tag = next((r for r in n["Resources"] if r.startswith("node_")), "?")
        names[n["NodeID"][:8]] = tag
    return names


def _wait_for_nodes(address: str, count: int, logs: Path, timeout: float = 90) -> None:
    """Until the cluster has `count` live nodes: a node that has not joined yet cannot take a
    worker, and Ray would place everything on the head. Asked from a process of its own, so
    that this one never becomes a Ray driver."""
    probe = (
        "import sys, time, ray\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        f"deadline = time.monotonic() + {timeout}\n"
        f"while len([n for n in ray.nodes() if n['Alive']]) < {count}:\n"
        "    if time.monotonic() > deadline: sys.exit(1)\n"
        "    time.sleep(0.5)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **RAY_ENV},
                            capture_output=True, text=True, timeout=timeout + 60)  # fmt: skip
    assert result.returncode == 0, (
        f"the cluster did not reach {count} nodes: {result.stderr[-2000:]}\n"
        + (logs / "node_b.log").read_text()[-2000:]
    )


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
