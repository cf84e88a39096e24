"""`pagedserve serve --config`: the supervisor and its admin commands, on real processes.

One stack of two tiny models serves the module (a start costs about ten seconds of
interpreters importing torch); the tests go through it in order, as an operator would, and
the last one stops it with Ctrl-C and checks that nothing is left. The stack file's checks
and the admin API's token need no processes.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from processes import descendants, still_alive_after
from servers import free_port, wait_until
from typer.testing import CliRunner

from pagedserve.deploy.cli import app
from pagedserve.deploy.stack_config import ConfigError, load_stack_config

ENGINE = "{max_model_len: 1024, kv_cache_memory: 33554432}"
TOKEN = secrets.token_hex(16)  # the module's stack runs with a control token
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Stack:
    process: subprocess.Popen
    admin_url: str
    gateway_url: str
    log: Path
    model_paths: dict[str, Path]

    controller_url: str

    def cli(self, *args: str, token: str | None = TOKEN) -> tuple[int, str]:
        env = {"PAGEDSERVE_CONTROL_TOKEN": token} if token else {}
        result = CliRunner().invoke(app, [*args, "--admin-url", self.admin_url], env=env)
        return result.exit_code, result.output

    def workers(self) -> list[dict]:
        reply = httpx.get(f"{self.admin_url}/admin/workers", headers=AUTH, timeout=10)
        return reply.json()["workers"]

    def ready(self, model: str) -> list[dict]:
        return [w for w in self.workers() if w["model"] == model and w["state"] == "ready"]

    def listed(self) -> set[str]:
        """The models the gateway offers (it refreshes its view of the workers every 2 s)."""
        reply = httpx.get(f"{self.gateway_url}/v1/models", timeout=10)
        return {m["id"] for m in reply.json()["data"]}

    def complete(self, model: str, max_tokens: int = 8) -> dict:
        body = {"model": model, "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0}
        reply = httpx.post(f"{self.gateway_url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()


def write_stack(tmp: Path, models: dict[str, Path], token: str | None = None, **ports: int) -> Path:
    entries = "\n".join(
        f"  - {{name: {name}, model_path: {path}, engine: {ENGINE}}}"
        for name, path in models.items()
    )
    text = (
        f"controller: {{port: {ports['controller']}}}\n"
        f"gateway: {{port: {ports['gateway']}}}\n"
        f"admin: {{port: {ports['admin']}}}\n"
        f"log_dir: {tmp / 'logs'}\n"
        f"worker_base_port: {ports['workers']}\n"
        "cpu_threads_per_worker: 1\n"
        + (f"control_token: {token}\n" if token else "")
        + f"models:\n{entries}\n"
    )
    path = tmp / "stack.yaml"
    path.write_text(text)
    return path


def serve(config: Path, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pagedserve.deploy.cli", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the test's Ctrl-C goes where the test sends it
            env={**os.environ, "PYTHONSAFEPATH": "1"},
        )


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, build_cached
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("supervisor")
    models = {"llama-a": tiny_llama, "qwen-b": build_cached("qwen2", "tiny")}
    ports = {"controller": free_port(), "gateway": free_port(), "admin": free_port(),
             "workers": 31000 + os.getpid() % 2000}  # fmt: skip
    log = tmp / "serve.log"
    process = serve(write_stack(tmp, models, TOKEN, **ports), log)
    s = Stack(process, f"http://127.0.0.1:{ports['admin']}", f"http://127.0.0.1:{ports['gateway']}",
              log, models, f"http://127.0.0.1:{ports['controller']}")  # fmt: skip

    def up() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        return all(len(s.ready(m)) == 1 for m in models) and s.listed() >= set(models)

    try:
        wait_until(up, 180, 0.5, "both models ready")
        yield s
    finally:
        for proc in descendants(process.pid):
            proc.kill()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def test_serve_brings_up_every_model_of_the_file(stack: Stack) -> None:
    assert {"llama-a", "qwen-b"} <= stack.listed()
    for model in ("llama-a", "qwen-b"):
        assert stack.complete(model)["usage"]["completion_tokens"] == 8

    code, out = stack.cli("workers", "list", "--json")
    assert code == 0, out
    rows = {r["worker_id"]: r for r in json.loads(out)}
    assert set(rows) == {"llama-a-0", "qwen-b-0"}
    for row in rows.values():
        assert row["state"] == "ready" and row["node"] == "local" and row["managed"]
        assert row["address"].startswith("http://127.0.0.1:")
        assert row["last_heartbeat"] is not None and row["last_heartbeat"] < 10

    code, out = stack.cli("status", "--json")
    status = json.loads(out)
    assert code == 0 and status["launcher"] == "local"
    assert {s["name"]: s["healthy"] for s in status["services"]} == {
        "controller": True,
        "gateway": True,
    }
    assert {m["name"]: (m["replicas"], m["ready"]) for m in status["models"]} == {
        "llama-a": (1, 1),
        "qwen-b": (1, 1),
    }
    code, out = stack.cli("workers", "list")  # the table a person reads
    assert code == 0 and "llama-a-0" in out and "qwen-b-0" in out


@dataclass
class StreamResult:
    worker: str | None = None  # from the gateway's x-pagedserve-route header
    finish: str | None = None
    ended: float = 0.0


def _stream(gateway_url: str, model: str, max_tokens: int, result: StreamResult) -> None:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}  # fmt: skip
    try:
        with httpx.stream("POST", f"{gateway_url}/v1/completions", json=body, timeout=120) as r:
            route = r.headers.get("x-pagedserve-route", "")
            result.worker = next((p.split("=", 1)[1] for p in route.split("; ")
                                  if p.startswith("worker=")), "?")  # fmt: skip
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.finish = "error: " + event["error"]["message"]
                    break
                result.finish = event["choices"][0]["finish_reason"] or result.finish
    except httpx.HTTPError as e:
        result.finish = f"error: {e}"
    result.ended = time.monotonic()


def test_the_stack_runs_on_its_control_token(stack: Stack) -> None:
    """Every part presents the token (the workers registered, the supervisor lists them);
    whoever lacks it can neither register a worker nor use the admin commands."""
    rogue = {"worker_name": "http://127.0.0.1:9", "check_heart_beat": False,
             "worker_status": {"model_names": ["llama-a"]}}  # fmt: skip
    reply = httpx.post(f"{stack.controller_url}/register_worker", json=rogue, timeout=10)
    assert reply.status_code == 401
    assert "http://127.0.0.1:9" not in {w["address"] for w in stack.workers()}
    code, out = stack.cli("workers", "list", token=None)
    assert code == 1 and "control token" in out
    assert TOKEN not in stack.log.read_text()


def test_scale_up_waits_for_ready_and_down_drains_without_losing_a_stream(stack: Stack) -> None:
    code, out = stack.cli("workers", "scale", "llama-a", "2")
    assert code == 0, out
    assert len(stack.ready("llama-a")) == 2  # up returns once the new replica is ready
    # The gateway refreshes its view of the workers every 2 s: until it has the new one,
    # every request goes to the old one.
    seen: set[str] = set()

    def both_routed() -> bool:
        reply = httpx.post(f"{stack.gateway_url}/v1/completions", timeout=30,
                           json={"model": "llama-a", "prompt": "hi", "max_tokens": 1})  # fmt: skip
        seen.add(reply.headers["x-pagedserve-route"].split("worker=")[1].split(";")[0])
        return len(seen) == 2

    wait_until(both_routed, 15, 0.2, "the gateway routing to both replicas")

    results = [StreamResult() for _ in range(8)]
    threads = [threading.Thread(target=_stream, args=(stack.gateway_url, "llama-a", 1000, r))
               for r in results]  # fmt: skip
    for t in threads:
        t.start()
    # Both replicas hold streams before one of them is taken away.
    wait_until(lambda: {r.worker for r in results} >= {"llama-a-0", "llama-a-1"}, 30, 0.02,
               "streams on both replicas")  # fmt: skip
    scaled_at = time.monotonic()
    code, out = stack.cli("workers", "scale", "llama-a", "1", "--json")
    assert code == 0, out
    (retired,) = json.loads(out)["changed"]
    for t in threads:
        t.join(120)
    assert [r.finish for r in results] == ["length"] * 8, results  # none lost, none cut short
    # The retired replica was serving when it was told to go, and finished what it had.
    assert any(r.worker == retired and r.ended > scaled_at for r in results), (retired, results)
    assert [w["worker_id"] for w in stack.workers() if w["model"] == "llama-a"] == [
        ({"llama-a-0", "llama-a-1"} - {retired}).pop()
    ]


def test_a_worker_killed_with_sigkill_is_restarted(stack: Stack) -> None:
    (victim,) = [p for p in descendants(stack.process.pid) if "--worker-id qwen-b-0" in p.cmd]
    os.kill(victim.pid, signal.SIGKILL)

    def back() -> bool:
        rows = [w for w in stack.workers() if w["worker_id"] == "qwen-b-0"]
        return bool(rows) and rows[0]["restarts"] == 1 and rows[0]["state"] == "ready"

    wait_until(back, 90, 0.2, "qwen-b-0 restarted")
    assert stack.complete("qwen-b")["usage"]["completion_tokens"] == 8
    assert "qwen-b-0 exited with status -9" in stack.log.read_text()


def test_launch_drain_and_stop_at_run_time(stack: Stack) -> None:
    path = str(stack.model_paths["llama-a"])
    code, out = stack.cli("workers", "launch", "extra", "--model-path", path,
                          "--engine", "max_model_len=256", "--engine", "kv_cache_memory=33554432")  # fmt: skip
    assert code == 0, out
    wait_until(lambda: "extra" in stack.listed(), 10, 0.2, "the gateway offers extra")
    assert stack.complete("extra")["usage"]["completion_tokens"] == 8

    code, out = stack.cli("workers", "launch", "extra", "--model-path", path)
    assert code == 1 and "served already" in out

    code, out = stack.cli("workers", "drain", "extra-0")
    assert code == 0, out
    wait_until(lambda: [w["state"] for w in stack.workers() if w["worker_id"] == "extra-0"]
               == ["draining"], 10, 0.2, "extra-0 draining")  # fmt: skip
    code, out = stack.cli("workers", "stop", "extra-0")
    assert code == 0, out
    assert not [w for w in stack.workers() if w["worker_id"] == "extra-0"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["workers", "scale", "nope", "1"], "unknown model 'nope'"),
        (["workers", "scale", "llama-a", "-1"], "must be 0 or more"),
        (["workers", "stop", "nope-7"], "unknown worker 'nope-7'"),
        (["workers", "drain", "nope-7"], "unknown worker 'nope-7'"),
        (
            ["workers", "launch", "x", "--model-path", "/no/such/model"],
            "no model at '/no/such/model'",
        ),
        (
            ["workers", "launch", "x", "--model-path", "/tmp", "--engine", "max_model_len"],
            "NAME=VALUE",
        ),
    ],
)
def test_bad_admin_commands_get_one_clear_message(
    stack: Stack, args: list[str], message: str
) -> None:
    code, out = stack.cli(*args)
    assert code == 1 and message in out, out
    assert stack.process.poll() is None


def test_an_unreachable_supervisor_gets_one_clear_message() -> None:
    result = CliRunner().invoke(
        app, ["workers", "list", "--admin-url", f"http://127.0.0.1:{free_port()}"]
    )
    assert result.exit_code == 1 and "no supervisor answers at" in result.output


def test_ctrl_c_stops_every_process(stack: Stack) -> None:
    procs = descendants(stack.process.pid)
    assert len(procs) >= 4  # controller, gateway, a worker per model
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(90) == 0
    assert not still_alive_after(procs, 10)


# -- no processes: the stack file and the admin API's token ------------------------------------


def test_a_bad_stack_file_names_its_lines_and_fields(tmp_path: Path, tiny_llama: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "controller: {port: 21001, colour: blue}\n"
        "models:\n"
        "  - name: a\n"
        f"    model_path: {tmp_path / 'missing'}\n"
        "    replicas: -1\n"
        "    engine: {max_model_len: many, warp_speed: 9}\n"
        "  - name: b\n"
        f"    model_path: {tiny_llama}\n"
        "    autoscale: {min_replicas: 3, max_replicas: 2}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_stack_config(path)
    lines = str(e.value).splitlines()
    assert f"{path}:1: controller.colour: Extra inputs are not permitted" in lines
    assert any(line.startswith(f"{path}:4: models[0].model_path: no model at") for line in lines)
    assert any(line.startswith(f"{path}:5: models[0].replicas:") for line in lines)
    engine = next(line for line in lines if line.startswith(f"{path}:6: models[0].engine:"))
    assert "warp_speed" in engine
    assert f"{path}:9: models[1].autoscale: min_replicas (3) is above max_replicas (2)" in lines

    path.write_text("models: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: not valid YAML"):
        load_stack_config(path)
    path.write_text(
        f"models:\n  - {{name: a, model_path: {tiny_llama}, engine: {{max_model_len: many}}}}\n"
    )
    with pytest.raises(ConfigError, match="max_model_len: Input should be a valid integer"):
        load_stack_config(path)


def test_serve_refuses_a_port_in_use_before_starting_anything(
    tmp_path: Path, tiny_llama: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_stack(tmp_path, {"a": tiny_llama}, controller=free_port(), gateway=port,
                             admin=free_port(), workers=free_port())  # fmt: skip
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "pagedserve.deploy.cli", "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 for the gateway is in use" in result.stderr
    assert not (tmp_path / "logs").exists()  # nothing started
    assert time.monotonic() - started < 30


def test_the_admin_api_wants_the_control_token_when_one_is_set(
    tmp_path: Path, tiny_llama: Path
) -> None:
    import asyncio

    from pagedserve.deploy.admin_api import create_admin_app
    from pagedserve.deploy.replicas import LocalLauncher
    from pagedserve.deploy.stack_config import StackConfig
    from pagedserve.deploy.supervisor import Supervisor

    token = "s3cret-token-of-the-stack"
    config = StackConfig(control_token=token, admin={"host": "0.0.0.0"}, log_dir=tmp_path)
    supervisor = Supervisor(config, LocalLauncher("127.0.0.1", free_port(), tmp_path))

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_admin_app(supervisor))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            return [
                await client.get("/admin/workers"),
                await client.get("/admin/workers", headers={"Authorization": "Bearer wrong"}),
                await client.post("/admin/models/x/scale", json={"replicas": 1}),
                await client.get("/admin/health"),
                await client.post(
                    "/admin/models/x/scale",
                    json={"replicas": 1},
                    headers={"Authorization": f"Bearer {token}"},
                ),  # fmt: skip
            ]

    no_token, wrong, scale, health, authorized = asyncio.run(calls())
    for reply in (no_token, wrong, scale):
        assert reply.status_code == 401
        assert reply.json()["error"]["type"] == "authentication_error"
    assert health.status_code == 200
    assert (
        authorized.status_code == 404
        and "unknown model 'x'" in authorized.json()["error"]["message"]
    )

    with pytest.raises(ValueError, match="beyond this machine: set control_token"):
        StackConfig(admin={"host": "0.0.0.0"}, control_token=None)


def test_restarts_back_off_and_five_quick_crashes_are_a_crash_loop(tmp_path: Path) -> None:
    from pagedserve.deploy.replicas import LocalLauncher
    from pagedserve.deploy.stack_config import StackConfig
    from pagedserve.deploy.supervisor import BACKOFF_MAX, CRASH_WINDOW, ManagedReplica, Supervisor

    supervisor = Supervisor(StackConfig(log_dir=tmp_path), LocalLauncher("127.0.0.1", 1, tmp_path))
    replica = ManagedReplica("m-0", "m")
    delays = []
    for _ in range(7):
        before = time.monotonic()
        supervisor._crashed(replica, 1)
        delays.append(round(replica.restart_at - before))
        assert replica.state == ("crash-loop" if len(replica.crashes) >= 5 else "backoff")
    assert delays == [1, 2, 4, 8, 16, BACKOFF_MAX, BACKOFF_MAX]
    replica.crashes = type(replica.crashes)([time.monotonic() - CRASH_WINDOW - 1] * 6)
    supervisor._crashed(replica, 1)  # the old crashes fell out of the window: a fresh start
    assert replica.state == "backoff" and round(replica.restart_at - time.monotonic()) == 1


def test_a_count_outside_the_autoscale_bounds_is_refused(tmp_path: Path, tiny_llama: Path) -> None:
    import asyncio

    from pagedserve.deploy.replicas import LocalLauncher
    from pagedserve.deploy.stack_config import ModelSection, StackConfig
    from pagedserve.deploy.supervisor import ModelGroup, Supervisor, SupervisorError

    spec = ModelSection(name="m", model_path=str(tiny_llama),
                        autoscale={"min_replicas": 1, "max_replicas": 2})  # fmt: skip
    supervisor = Supervisor(StackConfig(log_dir=tmp_path), LocalLauncher("127.0.0.1", 1, tmp_path))
    supervisor.models["m"] = ModelGroup(spec, target=1)
    for count in (3, 0, -1):
        with pytest.raises(SupervisorError) as e:
            asyncio.run(supervisor.scale("m", count))
        assert e.value.status == 400
    assert supervisor.models["m"].target == 1 and not supervisor.models["m"].replicas


def test_serve_refuses_a_ray_address_that_does_not_answer(tmp_path: Path, tiny_llama: Path) -> None:
    config = write_stack(tmp_path, {"a": tiny_llama}, controller=free_port(), gateway=free_port(),
                         admin=free_port(), workers=free_port())  # fmt: skip
    config.write_text(config.read_text() + f"ray: {{address: '127.0.0.1:{free_port()}'}}\n")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve.deploy.cli", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "no Ray cluster answers at 127.0.0.1:" in result.stderr
    assert not (tmp_path / "logs").exists()  # nothing started
    assert time.monotonic() - started < 60
