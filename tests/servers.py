"""Process helpers for service tests: free loopback ports, server subprocesses that are always
torn down, a real redis-server, and a stub worker that speaks the worker side of the
controller protocol without a model.

Run as a script, this file is the stub worker: `python tests/servers.py stub-worker ...`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
from fastapi import Request  # module level: the stub's routes name it in string annotations

T = TypeVar("T")
HERE = Path(__file__).resolve()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    probe: Callable[[], T | None], timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    """Call `probe` until it returns something truthy (returned) or `timeout` passes (raises)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except (httpx.HTTPError, ValueError, KeyError) as e:
            last_error = e
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{what} not reached within {timeout:.1f}s (last error: {last_error})"
            )
        time.sleep(interval)


def metric(url: str, name: str, headers: dict[str, str] | None = None, **labels: str) -> float:
    """A Prometheus metric of the server at `url`, summed over the series matching `labels`;
    0 when absent."""
    total = 0.0
    for line in httpx.get(url + "/metrics", headers=headers or {}, timeout=5).text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


class ServerProcess:
    """One server subprocess on a loopback port, its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        log_dir: Path,
        ready_path: str = "/health",
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}-{port}.log"
        self.ready_path = ready_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, wait: bool = True) -> ServerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        if wait and self.ready_path:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        def probe() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            return httpx.get(self.url + self.ready_path, timeout=2.0).status_code == 200

        try:
            wait_until(probe, timeout, interval=0.1, what=f"{self.name} {self.ready_path}")
        except TimeoutError as e:
            self.stop()
            raise TimeoutError(f"{e}\n{self.log_tail()}") from None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """kill -9: no goodbye to anyone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _flags(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pagedserve.deploy.cli", *args]


def controller_process(log_dir: Path, port: int | None = None, **options: Any) -> ServerProcess:
    """`pagedserve controller` with flags from keyword arguments (`redis_url=...`)."""
    port = port or free_port()
    argv = cli("controller", "--port", str(port), *_flags(options))
    return ServerProcess("controller", argv, port, log_dir)


def worker_process(
    log_dir: Path,
    model_path: Path,
    controller_url: str | None,
    port: int | None = None,
    **options: Any,
) -> ServerProcess:
    """`pagedserve worker` on a model folder; ready when its engine is loaded (/ready)."""
    port = port or free_port()
    flags = {"controller_address": controller_url, "no_register": controller_url is None}
    argv = cli(
        "worker",
        "--model-path",
        str(model_path),
        "--port",
        str(port),
        *_flags({**flags, **options}),
    )
    return ServerProcess("worker", argv, port, log_dir, ready_path="/ready")


def gateway_process(
    log_dir: Path, controller_url: str, port: int | None = None, **options: Any
) -> ServerProcess:
    """`pagedserve gateway` in front of a controller, flags from keyword arguments."""
    port = port or free_port()
    argv = cli(
        "gateway", "--port", str(port), "--controller-address", controller_url, *_flags(options)
    )
    return ServerProcess("gateway", argv, port, log_dir, ready_path="/health")


def ui_process(
    log_dir: Path, gateway_url: str, port: int | None = None, **options: Any
) -> ServerProcess:
    """`pagedserve ui` (the arena) in front of a gateway, flags from keyword arguments."""
    port = port or free_port()
    argv = cli("ui", "--port", str(port), "--gateway-url", gateway_url, *_flags(options))
    return ServerProcess("ui", argv, port, log_dir, ready_path="/health")


def stub_worker_process(
    log_dir: Path, controller_url: str | None, port: int | None = None, **options: Any
) -> ServerProcess:
    """The stub worker below, as a process."""
    port = port or free_port()
    argv = [sys.executable, str(HERE), "stub-worker", "--port", str(port)]
    if controller_url:
        argv += ["--controller", controller_url]
    argv += _flags(options)
    return ServerProcess("stub-worker", argv, port, log_dir, ready_path="/health")


# -- redis --------------------------------------------------------------------------------------


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence."""

    def __init__(self, log_dir: Path) -> None:
        binary = redis_server_path()
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install -y redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        self.process = ServerProcess("redis", argv, self.port, log_dir, ready_path="")

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.process.start()

        def pong() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        def probe() -> bool:
            try:
                return pong()
            except OSError:
                return False

        wait_until(probe, timeout, interval=0.05, what="redis-server PONG")
        return self

    def stop(self) -> None:
        self.process.stop()


def skip_or_fail_in_ci(reason: str) -> NoReturn:
    """pytest.skip where something a test needs is missing here (redis-server, chromium, a C++
    toolchain...); under CI (CI=true, as .ci/run sets it, on a machine meant to have all of
    them) pytest.fail: there a missing piece is a broken CI, not an optional test."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def redis_or_skip(log_dir: Path) -> Iterator[RedisServer]:
    """A started RedisServer, or a skip when redis-server is not installed (a failure in CI)."""
    if redis_server_path() is None:
        skip_or_fail_in_ci(
            "redis-server is not on PATH; install it with `apt-get install -y redis-server`"
        )
    server = RedisServer(log_dir).start()
    try:
        yield server
    finally:
        server.stop()


def start_all(*servers: ServerProcess, timeout: float = 60.0) -> None:
    """Start servers side by side (their start-ups overlap), then wait for each; if one fails,
    all are stopped."""
    try:
        for s in servers:
            s.start(wait=False)
        for s in servers:
            s.wait_ready(timeout)
    except BaseException:
        for s in servers:
            s.stop()
        raise


# -- the stub worker ----------------------------------------------------------------------------


def _stub_worker_main(argv: list[str]) -> None:
    """A worker without a model: FastChat's worker endpoints answer canned text.

    --kind fastchat registers the way FastChat 0.2.36's BaseModelWorker does (no worker_id, no
    /ready); --kind pagedserve adds a worker_id, load fields and /ready. POST /_control sets
    `ready` (HTTP status of /ready) and `queue_length` (reported in heartbeats).
    """
    import argparse
    import asyncio
    import json
    import threading
    import uuid

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--controller", default=None)
    parser.add_argument("--model-names", default="stub-model")
    parser.add_argument("--kind", choices=["fastchat", "pagedserve"], default="pagedserve")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--reply", default="hello from the stub")
    parser.add_argument("--token-delay", type=float, default=0.0)
    args = parser.parse_args(argv)

    address = f"http://127.0.0.1:{args.port}"
    state = {"ready": 200, "queue_length": 0, "id": uuid.uuid4().hex[:12]}
    names = args.model_names.split(",")

    def status() -> dict[str, Any]:
        body: dict[str, Any] = {
            "model_names": names,
            "speed": 1,
            "queue_length": state["queue_length"],
        }
        if args.kind == "pagedserve":
            body["worker_id"] = state["id"]
        return body

    def register() -> None:
        body = {
            "worker_name": address,
            "check_heart_beat": True,
            "worker_status": status(),
            "multimodal": False,
        }
        httpx.post(args.controller + "/register_worker", json=body, timeout=5).raise_for_status()

    def heartbeats() -> None:
        while True:
            time.sleep(args.heartbeat_interval)
            body: dict[str, Any] = {"worker_name": address, "queue_length": state["queue_length"]}
            if args.kind == "pagedserve":
                body["worker_id"] = state["id"]
            try:
                exist = httpx.post(
                    args.controller + "/receive_heart_beat", json=body, timeout=5
                ).json()["exist"]
                if not exist:
                    register()
            except (httpx.HTTPError, KeyError, ValueError):
                pass

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    if args.kind == "pagedserve":

        @app.get("/ready")
        async def ready() -> JSONResponse:
            return JSONResponse({"ready": state["ready"] == 200}, status_code=state["ready"])

    @app.post("/_control")
    async def control(request: Request) -> dict[str, Any]:
        state.update(await request.json())
        return state

    @app.post("/worker_get_status")
    async def get_status() -> dict[str, Any]:
        return status()

    # OpenAI's routes, with faults on demand (POST /_control): `openai_status` (answer that
    # status with an OpenAI error body), `first_byte_delay` (seconds before the answer),
    # `break_after` (end a stream abruptly after that many events). `openai_requests` counts
    # the requests, `last_request_id` keeps the last X-Request-Id header.
    state.update(openai_status=200, first_byte_delay=0.0, break_after=None, openai_requests=0)
    state["last_request_id"] = None

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def openai_route(request: Request) -> Any:
        body = await request.json()
        state["openai_requests"] += 1
        state["last_request_id"] = request.headers.get("x-request-id")
        await asyncio.sleep(state["first_byte_delay"])
        if state["openai_status"] != 200:
            error = {"message": "stub fault", "type": "stub", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=state["openai_status"])
        chat = request.url.path.endswith("chat/completions")
        words = args.reply.split(" ")
        usage = {
            "prompt_tokens": 1,
            "completion_tokens": len(words),
            "total_tokens": 1 + len(words),
        }
        base = {"id": "stub-1", "created": 1, "model": body.get("model")}
        if not body.get("stream"):
            text = " ".join(words)
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if chat
                else {"index": 0, "text": text}
            )
            kind = "chat.completion" if chat else "text_completion"
            return {
                **base,
                "object": kind,
                "usage": usage,
                "choices": [{**choice, "finish_reason": "stop"}],
            }

        def event(i: int, word: str | None) -> bytes:
            done = word is None
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if done else None}
            if chat:
                choice["delta"] = {} if done else {"content": word}
            else:
                choice["text"] = "" if done else word
            kind = "chat.completion.chunk" if chat else "text_completion"
            return f"data: {json.dumps({**base, 'object': kind, 'choices': [choice]})}\n\n".encode()

        async def events():
            for i, word in enumerate([*words, None]):
                if state["break_after"] is not None and i >= state["break_after"]:
                    raise RuntimeError("stub worker dies mid-stream")
                await asyncio.sleep(args.token_delay)
                yield event(i, word)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request) -> StreamingResponse:
        params = await request.json()

        async def frames():
            words = args.reply.split(" ")
            for i in range(len(words)):
                await asyncio.sleep(args.token_delay)
                text = " ".join(words[: i + 1])
                done = i == len(words) - 1
                yield (
                    json.dumps(
                        {
                            "text": text,
                            "error_code": 0,
                            "usage": {
                                "prompt_tokens": 1,
                                "completion_tokens": i + 1,
                                "total_tokens": i + 2,
                            },
                            "finish_reason": "stop" if done else None,
                            "worker": address,
                            "echo_model": params.get("model"),
                        }
                    ).encode()
                    + b"\0"
                )

        return StreamingResponse(frames())

    if args.controller:
        for _ in range(50):  # the controller may still be starting
            try:
                register()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        threading.Thread(target=heartbeats, daemon=True).start()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    if sys.argv[1:2] == ["stub-worker"]:
        _stub_worker_main(sys.argv[2:])
    else:
        raise SystemExit("usage: python tests/servers.py stub-worker --port P [--controller URL]")
