"""`pagedserve serve --config` with a `ray:` section: the supervisor places its workers on a
real two-node Ray cluster on this host (tests/ray_cluster.py) instead of local processes.
Scaling up spreads the replicas over both nodes, `workers list` says where each runs, and a
node that dies gets its workers replaced on the node that is left. The controller and the
gateway stay outside Ray, as local processes of the supervisor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from processes import descendants
from ray_cluster import RAY_ENV, kill_node, two_node_cluster
from servers import free_port, wait_until
from typer.testing import CliRunner

from pagedserve.deploy.cli import app

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def test_workers_spread_over_the_cluster_and_a_lost_node_is_replaced(
    tmp_path: Path, tiny_llama: Path
) -> None:
    admin, gateway = free_port(), free_port()
    admin_url, gateway_url = f"http://127.0.0.1:{admin}", f"http://127.0.0.1:{gateway}"
    with two_node_cluster(tmp_path) as cluster:
        config = tmp_path / "stack.yaml"
        config.write_text(
            f"controller: {{port: {free_port()}}}\n"
            f"gateway: {{port: {gateway}}}\n"
            f"admin: {{port: {admin}}}\n"
            f"log_dir: {tmp_path / 'logs'}\n"
            f"ray: {{address: '{cluster.address}', cpus_per_worker: 1}}\n"
            "models:\n"
            f"  - {{name: tiny, model_path: {tiny_llama}, replicas: 1,\n"
            "      engine: {max_model_len: 256, kv_cache_memory: 33554432, cpu_threads: 1}}\n"
        )
        log = tmp_path / "serve.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "pagedserve.deploy.cli", "serve", "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **RAY_ENV, "PYTHONSAFEPATH": "1"},
            )  # fmt: skip
        try:

            def cli(*args: str) -> str:
                result = CliRunner().invoke(app, [*args, "--admin-url", admin_url, "--json"])
                assert result.exit_code == 0, result.output
                return result.output

            def workers() -> list[dict]:
                return httpx.get(f"{admin_url}/admin/workers", timeout=10).json()["workers"]

            def serving() -> bool:
                assert process.poll() is None, log.read_text()[-3000:]
                return any(w["state"] == "ready" for w in workers())

            wait_until(serving, 180, 0.5, "the first replica")
            assert json.loads(cli("status"))["launcher"] == "ray"
            cli("workers", "scale", "tiny", "2")  # returns once the second is ready
            rows = json.loads(cli("workers", "list"))
            assert [r["state"] for r in rows] == ["ready", "ready"]
            assert len({r["node"] for r in rows}) == 2  # one on each node
            for row in rows:  # each answers where it says it is
                assert httpx.get(f"{row['address']}/ready", timeout=5).status_code == 200

            # Lose node_b (the replica that is not on the head's node) with everything on it.
            import ray

            ray.init(address=cluster.address, logging_level="ERROR")
            head_node = next(n["NodeID"][:8] for n in ray.nodes() if "node_a" in n["Resources"])
            ray.shutdown()
            (lost,) = [r for r in rows if r["node"] != head_node]
            kill_node(cluster.node_b)

            def replaced() -> bool:
                now = {r["worker_id"]: r for r in workers()}
                row = now[lost["worker_id"]]
                return row["restarts"] >= 1 and row["state"] == "ready" and row["node"] == head_node

            wait_until(replaced, 180, 1.0, f"{lost['worker_id']} replaced on the head's node")
            wait_until(lambda: lost["worker_id"] in _routed(gateway_url), 30, 0.2,
                       "the gateway routing to the replacement")  # fmt: skip
        finally:
            procs = descendants(process.pid)
            process.send_signal(signal.SIGINT)
            try:
                assert process.wait(90) == 0, log.read_text()[-3000:]
            finally:
                for proc in procs:
                    proc.kill()


def _routed(gateway_url: str) -> str:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    reply = httpx.post(f"{gateway_url}/v1/completions", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.headers["x-pagedserve-route"]
