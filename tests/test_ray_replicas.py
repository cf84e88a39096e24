"""Workers on a real two-node Ray cluster (two raylets on this host, `node_a` the head and
`node_b`): one-rank replicas spread over the nodes and answer at their address; a replica
whose node dies reports -1 while the other runs on; a two-rank replica's ranks share the one
placement group its launcher holds; a dead address is refused within seconds.

Select them with `-m ray`."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
from processes import Proc, still_alive_after
from ray_cluster import kill_node, node_names, two_node_cluster
from servers import wait_until

from pagedserve.deploy.ray_replicas import RayLauncher
from pagedserve.deploy.replicas import LaunchError, WorkerLaunch
from pagedserve.deploy.stack_config import RaySection

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

WORKER_ARGS = ["--model-names", "tiny", "--no-register", "--max-model-len", "256",
               "--kv-cache-memory", "33554432", "--cpu-threads", "1", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (`node_a`) and a second node (`node_b`) on this host; yields (address, node_b)."""
    with two_node_cluster(tmp_path_factory.mktemp("ray")) as c:
        yield c.address, c.node_b


@pytest.fixture(scope="module")
def launcher(cluster, tmp_path_factory):
    address, _ = cluster
    launcher = RayLauncher(address, RaySection(address=address), tmp_path_factory.mktemp("logs"))
    ray = launcher.ray
    wait_until(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 60, what="two nodes")
    yield launcher
    launcher.close()


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
        names = node_names(launcher.ray)
        assert {names[r.node] for r in replicas} == {"node_a", "node_b"}
        for r in replicas:
            wait_until(lambda r=r: _ready(r), 120, interval=0.5, what=f"{r.replica_id} ready")
            assert _complete(r)
        lost = next(r for r in replicas if names[r.node] == "node_b")
        kept = next(r for r in replicas if names[r.node] == "node_a")
        process = Proc.of(lost.pid)  # the host is shared: its process is visible here
        assert process is not None

        kill_node(node_b)  # the whole node at once: raylet, actors
        start = time.monotonic()
        wait_until(lambda: lost.poll() == -1, 60, interval=0.5, what="the lost replica's -1")
        print(f"poll() == -1 {time.monotonic() - start:.1f}s after the node died")
        assert not still_alive_after([process], 15), "the worker outlived its node"
        assert kept.poll() is None and _complete(kept)
    finally:
        for r in replicas:
            _stop_replica(launcher, r)
