"""FastChat interoperability, both ways:

- FastChat 0.2.36's own `fastchat.serve.openai_api_server`, in a virtual environment of its
  own (pydantic 1, as FastChat needs; cached between runs), pointed at a pagedserve controller,
  serves chat completions (streaming and not) from pagedserve workers.
- A minimal FastChat-style worker, written below from FastChat's protocol, registers with a
  pagedserve controller, stays registered through heartbeats and health checks, and serves
  through it.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import (
    ServerProcess,
    controller_process,
    free_port,
    start_all,
    wait_until,
    worker_process,
)

from benchmarks.peers import fastchat_python


@pytest.fixture(scope="module")
def pagedserve_stack(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A pagedserve controller with two tiny-model workers registered."""
    log_dir = tmp_path_factory.mktemp("interop")
    with controller_process(log_dir, health_check_interval=1).start() as ctl:
        workers = [
            worker_process(
                log_dir,
                tiny_llama,
                ctl.url,
                model_names="tiny",
                heartbeat_interval=1,
                kv_cache_memory=16 << 20,
                max_model_len=256,
            )
            for _ in range(2)
        ]
        try:
            start_all(*workers)
            wait_until(
                lambda: len(httpx.get(ctl.url + "/workers").json()["workers"]) == 2,
                10,
                what="workers registered",
            )
            yield ctl
        finally:
            for w in workers:
                w.stop()


@pytest.fixture(scope="module")
def fastchat_api(
    pagedserve_stack: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    python = fastchat_python()
    run_dir = tmp_path_factory.mktemp("fschat")  # FastChat writes its log files into the cwd
    port = free_port()
    argv = [
        str(python), "-m", "fastchat.serve.openai_api_server",
        "--host", "127.0.0.1", "--port", str(port), "--controller-address", pagedserve_stack.url,
    ]  # fmt: skip
    server = ServerProcess(
        "fschat-openai",
        argv,
        port,
        run_dir,
        ready_path="/v1/models",
        env={"LOGDIR": str(run_dir)},
        cwd=run_dir,
    )
    with server.start(timeout=60):
        yield server


def test_fastchat_openai_server_lists_pagedserve_models(fastchat_api: ServerProcess) -> None:
    models = httpx.get(fastchat_api.url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_fastchat_openai_server_chats_through_pagedserve_without_streaming(
    fastchat_api: ServerProcess,
) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    r = httpx.post(fastchat_api.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["object"] == "chat.completion"
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < reply["usage"]["completion_tokens"] <= 8
    assert reply["usage"]["prompt_tokens"] > 0


def test_fastchat_openai_server_streams_chat_through_pagedserve(
    fastchat_api: ServerProcess,
) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    r = httpx.post(fastchat_api.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error_code" not in c for c in chunks), chunks
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    whole = httpx.post(
        fastchat_api.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60
    ).json()
    assert streamed == whole["choices"][0]["message"]["content"]  # greedy: same text


def test_fastchat_openai_server_completions_through_pagedserve(
    fastchat_api: ServerProcess, pagedserve_stack: ServerProcess
) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    r = httpx.post(fastchat_api.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    # The same request sent to a worker directly, as FastChat's get_gen_params builds it: no
    # echo, the conversation template's stop string and stop token ids.
    ctl = pagedserve_stack.url
    worker = httpx.post(ctl + "/get_worker_address", json={"model": "tiny"}).json()["address"]
    conv = httpx.post(worker + "/worker_get_conv_template", json={"model": "tiny"}).json()["conv"]
    stop = conv["stop_str"]
    params = {
        "model": "tiny", "prompt": body["prompt"], "temperature": 0, "max_new_tokens": 6,
        "echo": False, "stop": [stop] if isinstance(stop, str) else list(stop or []),
        "stop_token_ids": conv["stop_token_ids"],
    }  # fmt: skip
    direct = httpx.post(worker + "/worker_generate", json=params, timeout=60).json()
    assert direct["error_code"] == 0, direct
    choice = got["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (direct["text"], direct["finish_reason"])
    assert got["usage"] == direct["usage"]
    tokens = got["usage"]["completion_tokens"]
    assert 0 < tokens <= 6 and (tokens == 6) == (choice["finish_reason"] == "length")


def test_fastchat_openai_server_gets_a_clear_error_for_bad_parameters(
    fastchat_api: ServerProcess,
) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "stop": [""],  # FastChat passes it on; the worker refuses an empty stop string
    }
    r = httpx.post(fastchat_api.url + "/v1/chat/completions", json=body, timeout=60)
    # FastChat turns a worker's non-200 answer into its own error object; nothing hangs or 500s
    assert r.status_code == 400
    assert "error_code" in r.json() or "message" in r.json()


# -- a FastChat-style worker registering with pagedserve's controller -------------------------

FASTCHAT_STYLE_WORKER = textwrap.dedent(
    '''
    """A minimal worker speaking FastChat 0.2.36's protocol (base_model_worker.py), nothing more."""
    import json, sys, threading, time
    import httpx, uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    controller, port = sys.argv[1], int(sys.argv[2])
    address = f"http://127.0.0.1:{port}"
    app = FastAPI()

    def get_status():
        return {"model_names": ["fastchat-echo"], "speed": 1, "queue_length": 0}

    def register_to_controller():
        data = {"worker_name": address, "check_heart_beat": True,
                "worker_status": get_status(), "multimodal": False}
        r = httpx.post(controller + "/register_worker", json=data)
        assert r.status_code == 200

    def heart_beat_worker():
        while True:
            time.sleep(1)
            ret = httpx.post(controller + "/receive_heart_beat",
                             json={"worker_name": address, "queue_length": 0}, timeout=5)
            if not ret.json()["exist"]:
                register_to_controller()

    @app.post("/worker_get_status")
    async def api_get_status(request: Request):
        return get_status()

    @app.post("/worker_generate_stream")
    async def api_generate_stream(request: Request):
        params = await request.json()
        def gen():
            text = ""
            for word in ["you", "said:", params["prompt"]]:
                text = (text + " " + word).strip()
                yield json.dumps({"text": text, "error_code": 0}).encode() + b"\\0"
        return StreamingResponse(gen())

    @app.post("/model_details")
    async def api_model_details(request: Request):
        return {"context_length": 2048}

    if __name__ == "__main__":
        register_to_controller()
        threading.Thread(target=heart_beat_worker, daemon=True).start()
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    '''
)


def test_a_fastchat_style_worker_registers_and_serves_through_the_controller(
    tmp_path: Path,
) -> None:
    script = tmp_path / "fastchat_style_worker.py"
    script.write_text(FASTCHAT_STYLE_WORKER)
    with controller_process(
        tmp_path,
        health_check_interval=0.3,
        health_check_failure_threshold=2,
        heartbeat_expiration=3,
    ).start() as ctl:
        port = free_port()
        worker = ServerProcess(
            "fastchat-style-worker",
            [sys.executable, str(script), ctl.url, str(port)],
            port,
            tmp_path,
            ready_path="",
        )
        with worker.start():
            wait_until(
                lambda: "fastchat-echo" in httpx.post(ctl.url + "/list_models").json()["models"],
                15,
                what="registered",
            )
            entry = httpx.get(ctl.url + "/workers").json()["workers"][0]
            assert entry["kind"] == "fastchat" and entry["worker_name"] == worker.url

            r = httpx.post(ctl.url + "/get_worker_address", json={"model": "fastchat-echo"})
            assert r.json() == {"address": worker.url}
            with httpx.stream(
                "POST",
                ctl.url + "/worker_generate_stream",
                json={"model": "fastchat-echo", "prompt": "hi"},
            ) as s:
                raw = s.read()
            assert [json.loads(f)["text"] for f in raw.split(b"\0") if f] == [
                "you",
                "you said:",
                "you said: hi",
            ]

            def outlived_an_expiry_period() -> bool:
                # Heartbeats and /worker_get_status checks keep it: listed all along, ready,
                # and never dropped and registered again (its registration time is the first).
                workers = httpx.get(ctl.url + "/workers").json()["workers"]
                assert [w["worker_name"] for w in workers] == [worker.url], workers
                (w,) = workers
                assert w["registered_at"] == entry["registered_at"], w
                assert w["status"] == "ready", w
                return w["last_heart_beat"] - w["registered_at"] > 3  # heartbeat_expiration

            wait_until(outlived_an_expiry_period, 30, what="a heartbeat past one expiry period")
            worker.kill()
            wait_until(
                lambda: httpx.get(ctl.url + "/workers").json()["workers"] == [],
                5,
                what="dead worker removed",
            )
