"""Workers on a real two-node Ray cluster (two raylets on this host, `node_a` the head and
`node_b`): one-rank replicas spread over the nodes and answer at their address; a replica
whose node dies reports -1 while the other runs on; a two-rank replica's ranks share the one
placement group its launcher holds; a dead address is refused within seconds.

Select them with `-m ray`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from processes import Proc, still_alive_after
from servers import wait_until

from pagedserve.deploy.ray_replicas import RayLauncher
from pagedserve.deploy.replicas import LaunchError, WorkerLaunch
from pagedserve.deploy.stack_config import RaySection

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

RAY = Path(sys.executable).parent / "ray"
WORKER_ARGS = ["--model-names", "tiny", "--no-register", "--max-model-len", "256",
               "--kv-cache-memory", "33554432", "--cpu-threads", "1", "--device", "cpu"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(*args: str, log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own process group: killing the group is losing the node.
    The cluster authenticates as this process will (see test_tensor_parallel.py)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _stop(node: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM (ray start stops its daemons), SIGKILL to the group for what is left."""
    with contextlib.suppress(ProcessLookupError):
        node.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.pid, signal.SIGKILL)
    node.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (`node_a`) and a second node (`node_b`) on this host; yields (address, node_b)."""
    logs = tmp_path_factory.mktemp("ray")
    port = _free_port()
    head = _ray_start("--head", f"--port={port}", "--include-dashboard=false",
                      '--resources={"node_a": 1}', log=logs / "head.log")  # fmt: skip
    nodes = [head]
    try:
        wait_until(lambda: _answers(port) or head.poll() is not None, 60, what="the Ray head")
        assert head.poll() is None, (logs / "head.log").read_text()[-2000:]
        node_b = _ray_start(f"--address=127.0.0.1:{port}", '--resources={"node_b": 1}',
                            log=logs / "node_b.log")  # fmt: skip
        nodes.append(node_b)
        yield f"127.0.0.1:{port}", node_b
    finally:
        for node in reversed(nodes):
            _stop(node)
        marker = Path("/tmp/ray/ray_current_cluster")  # `ray start` leaves its address here
        if marker.is_file() and marker.read_text().strip().endswith(f":{port}"):
            marker.unlink()


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def launcher(cluster, tmp_path_factory):
    address, _ = cluster
    launcher = RayLauncher(address, RaySection(address=address), tmp_path_factory.mktemp("logs"))
    ray = launcher.ray
    wait_until(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 60, what="two nodes")
    yield launcher
    launcher.close()


def _node_names(ray) -> dict[str, str]:
    """Short node name (as replicas give it) -> the custom resource it was started with."""
    names = {}
    for n in ray.nodes():
        tag = next((r for r in n["Resources"] if r.startswith("node_")), "?")
        names[n["NodeID"][:8]] = tag
    return names


def _launch(launcher, replica_id: str, model: Path, tp: int = 1):
    args = ["--model-path", str(model), *WORKER_ARGS]
    if tp > 1:
        args += ["--tensor-parallel-size", str(tp)]
    return launcher.launch(WorkerLaunch(replica_id, "tiny", args, tensor_parallel_size=tp))


def _ready(replica) -> bool:
    assert replica.poll() is None, f"{replica.replica_id} exited: see {replica.log_path}"
    return httpx.get(f"{replica.address}/ready", timeout=2).status_code == 200


def _complete(replica) -> str:
    r = httpx.post(
        f"{replica.address}/v1/completions",
        json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _stop_replica(launcher, replica) -> None:
    replica.terminate()
    if not replica.wait(20):
        replica.kill()
    launcher.release(replica)


@pytest.mark.parametrize("listening", [False, True], ids=["closed-port", "silent-port"])
def test_a_dead_address_is_refused_within_seconds(tmp_path, listening):
    """Nothing there, or something that accepts and never answers (Ray would retry for
    more than a minute)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        if listening:
            s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(LaunchError, match=rf"no Ray cluster answers at {address}; start one"):
            RayLauncher(address, RaySection(address=address), tmp_path)
    assert time.monotonic() - start < 10


def test_two_ranks_share_the_launchers_placement_group(launcher, tiny_llama):
    """Two CPUs a node: the group's two bundles fill one node, so a second group of the
    engine's own could not be placed, and the worker would never be ready."""
    ray = launcher.ray
    replica = _launch(launcher, "tp2", tiny_llama, tp=2)
    try:
        wait_until(lambda: _ready(replica), 180, interval=0.5, what="the two-rank worker ready")
        assert _complete(replica)
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
        assert len(groups) == 1 and groups[0]["placement_group_id"] == replica.group.id.hex()
        assert set(groups[0]["bundles_to_node_id"].values()) == {_node_id(ray, replica.node)}
    finally:
        _stop_replica(launcher, replica)
    assert replica.poll() is not None


def _node_id(ray, short: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["NodeID"].startswith(short))


def test_replicas_spread_over_nodes_and_a_lost_node_reads_minus_one(cluster, launcher, tiny_llama):
    _, node_b = cluster
    replicas = [_launch(launcher, f"r{i}", tiny_llama) for i in range(2)]
    try:
        names = _node_names(launcher.ray)
        assert {names[r.node] for r in replicas} == {"node_a", "node_b"}
        for r in replicas:
            wait_until(lambda r=r: _ready(r), 120, interval=0.5, what=f"{r.replica_id} ready")
            assert _complete(r)
        lost = next(r for r in replicas if names[r.node] == "node_b")
        kept = next(r for r in replicas if names[r.node] == "node_a")
        process = Proc.of(lost.pid)  # the host is shared: its process is visible here
        assert process is not None

        os.killpg(node_b.pid, signal.SIGKILL)  # the whole node at once: raylet, actors
        start = time.monotonic()
        wait_until(lambda: lost.poll() == -1, 60, interval=0.5, what="the lost replica's -1")
        print(f"poll() == -1 {time.monotonic() - start:.1f}s after the node died")
        assert not still_alive_after([process], 15), "the worker outlived its node"
        assert kept.poll() is None and _complete(kept)
    finally:
        for r in replicas:
            _stop_replica(launcher, r)
