"""The opt-in control token: a controller, a tiny-model worker and a gateway that share one
(as processes, started once for the module) refuse whoever does not present it, keep their
public routes open, and still serve a chat completion end to end. Without a token nothing
changes: the other service tests run the same servers without one."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from servers import (
    ServerProcess,
    controller_process,
    gateway_process,
    start_all,
    wait_until,
    worker_process,
)

from pagedserve.api_gateway.app import create_app as create_gateway
from pagedserve.api_gateway.config import GatewayConfig
from pagedserve.controller.config import ControllerConfig
from pagedserve.protocol.control_token import check_bearer
from pagedserve.worker.config import WorkerConfig

TOKEN = "ctl-0123456789abcdef"
API_KEY = "sk-alice-0123456789"
ENGINE = {"kv_cache_memory": 16 << 20, "max_model_len": 256}
_ports = itertools.count(41000)


@dataclass
class Stack:
    controller: ServerProcess
    worker: ServerProcess
    gateway: ServerProcess

    def processes(self) -> tuple[ServerProcess, ...]:
        return self.controller, self.worker, self.gateway


@pytest.fixture(scope="module")
def stack(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The controller takes the token as a flag, the worker and the gateway from the
    environment; the gateway also checks API keys."""
    log_dir = tmp_path_factory.mktemp("control-token")
    keys = log_dir / "keys.jsonl"
    keys.write_text(json.dumps({"key": API_KEY, "name": "alice"}) + "\n")
    env = {"PAGEDSERVE_CONTROL_TOKEN": TOKEN}
    with controller_process(log_dir, health_check_interval=1, control_token=TOKEN).start() as ctl:
        worker = worker_process(
            log_dir, tiny_llama, ctl.url, model_names="tiny", heartbeat_interval=1, **ENGINE
        )
        gateway = gateway_process(
            log_dir, ctl.url, api_keys=str(keys), routing_refresh_interval=0.5
        )
        worker.env = gateway.env = env
        try:
            start_all(worker, gateway)
            wait_until(
                lambda: len(get(gateway, "/v1/models", API_KEY).json().get("data", [])) == 1,
                20,
                what="the worker registered and routed",
            )
            yield Stack(ctl, worker, gateway)
        finally:
            gateway.stop()
            worker.stop()


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def get(p: ServerProcess, path: str, token: str | None = None) -> httpx.Response:
    return httpx.get(p.url + path, headers=bearer(token), timeout=30)


def post(p: ServerProcess, path: str, body: object = None, token: str | None = None):
    return httpx.post(p.url + path, json=body, headers=bearer(token), timeout=30)


def registration(address: str, model: str) -> dict:
    status = {"model_names": [model], "speed": 1, "queue_length": 0}
    return {"worker_name": address, "check_heart_beat": True, "worker_status": status}


def assert_fastchat_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    body = json.loads(r.content.rstrip(b"\0"))
    assert body["error_code"] == 40101 and "control token" in body["text"]


def fake_address() -> str:
    return f"http://127.0.0.1:{next(_ports)}"


# -- the controller -------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x"])
def test_a_registration_without_the_token_is_refused_and_never_listed(
    stack: Stack, token: str | None
) -> None:
    ctl, rogue = stack.controller, fake_address()
    assert_fastchat_401(post(ctl, "/register_worker", registration(rogue, "rogue"), token))
    listed = get(ctl, "/workers", TOKEN).json()["workers"]
    assert rogue not in {w["worker_name"] for w in listed}
    assert "rogue" not in post(ctl, "/list_models").json()["models"]


def test_a_registration_with_the_token_is_listed_and_heartbeats_need_it_too(
    stack: Stack,
) -> None:
    ctl, address = stack.controller, fake_address()
    assert post(ctl, "/register_worker", registration(address, "honest"), TOKEN).status_code == 200
    assert "honest" in post(ctl, "/list_models").json()["models"]
    beat = {"worker_name": address, "queue_length": 0}
    # /receive_heart_beat is answered by the plain-ASGI hot routes, ahead of the FastAPI app
    assert_fastchat_401(post(ctl, "/receive_heart_beat", beat))
    assert_fastchat_401(post(ctl, "/receive_heart_beat", beat, "wrong-token"))
    assert post(ctl, "/receive_heart_beat", beat, TOKEN).json() == {"exist": True}
    assert_fastchat_401(post(ctl, "/unregister_worker", {"worker_name": address}))
    assert post(ctl, "/unregister_worker", {"worker_name": address}, TOKEN).json() == {
        "removed": True
    }


def test_admin_and_proxy_routes_need_the_token_and_fastchats_client_routes_stay_open(
    stack: Stack,
) -> None:
    ctl = stack.controller
    generate = {"model": "tiny", "prompt": "Hello", "max_new_tokens": 4}
    refused = [
        ("GET", "/workers", None),
        ("POST", "/refresh_all_workers", None),
        ("POST", "/workers/nobody/drain", None),
        ("POST", "/worker_get_status", None),
        ("POST", "/worker_generate_stream", generate),
        ("POST", "/worker_api_generate_stream", generate),
    ]
    for method, path, body in refused:
        r = httpx.request(method, ctl.url + path, json=body, timeout=30)
        assert_fastchat_401(r)
        if path.endswith("generate_stream"):
            assert r.content.endswith(b"\0")  # framed as a stream's last message
    assert post(ctl, "/list_models").json()["models"] == ["tiny"]
    assert post(ctl, "/list_language_models").status_code == 200
    assert post(ctl, "/list_multimodal_models").status_code == 200
    assert post(ctl, "/get_worker_address", {"model": "tiny"}).json()["address"] == (
        stack.worker.url
    )
    for path in ("/test_connection", "/health", "/metrics"):
        assert get(ctl, path).status_code == 200, path


def test_the_controller_presents_the_token_when_it_proxies_to_a_worker(stack: Stack) -> None:
    ctl = stack.controller
    generate = {"model": "tiny", "prompt": "Hello", "max_new_tokens": 4, "temperature": 0}
    r = post(ctl, "/worker_generate_stream", generate, TOKEN)
    assert r.status_code == 200, r.text
    last = json.loads(r.content.rstrip(b"\0").split(b"\0")[-1])
    assert last["error_code"] == 0 and last["usage"]["completion_tokens"] == 4
    assert post(ctl, "/worker_get_status", None, TOKEN).json()["model_names"] == ["tiny"]
    workers = get(ctl, "/workers", TOKEN).json()["workers"]
    assert [w["worker_name"] for w in workers] == [stack.worker.url]
    assert workers[0]["status"] == "ready"  # its heartbeats and the /ready checks get through


# -- the worker -----------------------------------------------------------------------------------


def test_the_workers_generate_routes_need_the_token(stack: Stack) -> None:
    w = stack.worker
    generate = {"model": "tiny", "prompt": "Hello", "max_new_tokens": 4}
    for path, body in [
        ("/worker_generate_stream", generate),
        ("/worker_generate", generate),
        ("/count_token", {"prompt": "Hello"}),
        ("/worker_get_conv_template", None),
        ("/model_details", None),
        ("/worker_get_status", None),
    ]:
        for token in (None, "wrong-token"):
            assert_fastchat_401(post(w, path, body, token))
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for method, path, body in [
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 4}),
        ("POST", "/v1/chat/completions", chat),
        ("GET", "/v1/models", None),
    ]:
        for token in (None, "wrong-token"):
            r = httpx.request(method, w.url + path, json=body, headers=bearer(token), timeout=30)
            assert r.status_code == 401, r.text
            error = r.json()["error"]
            assert error["code"] == "invalid_api_key" and "control token" in error["message"]
    assert post(w, "/count_token", {"prompt": "Hello"}, TOKEN).json()["count"] > 0
    assert get(w, "/v1/models", TOKEN).json()["data"][0]["id"] == "tiny"


def test_the_workers_probes_stay_open(stack: Stack) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert get(stack.worker, path).status_code == 200, path


# -- the gateway ----------------------------------------------------------------------------------


def test_the_gateway_serves_a_chat_end_to_end_with_the_clients_key_not_the_token(
    stack: Stack,
) -> None:
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    r = post(stack.gateway, "/v1/chat/completions", chat, API_KEY)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    streamed = post(stack.gateway, "/v1/chat/completions", {**chat, "stream": True}, API_KEY)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    # the control token is no API key
    refused = post(stack.gateway, "/v1/chat/completions", chat, TOKEN)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_the_token_is_never_logged_and_each_part_says_whether_it_is_on(stack: Stack) -> None:
    for p in stack.processes():
        log = p.log_path.read_text(errors="replace")
        assert "control token: on" in log, p.name
        assert TOKEN not in log, p.name


# -- in process -----------------------------------------------------------------------------------


def test_check_bearer_takes_only_the_exact_token_after_bearer() -> None:
    assert check_bearer(b"Bearer " + TOKEN.encode(), TOKEN)
    assert check_bearer(b"bearer " + TOKEN.encode(), TOKEN)
    for header in (None, b"", TOKEN.encode(), b"Basic " + TOKEN.encode(), b"Bearer x", b"Bearer "):
        assert not check_bearer(header, TOKEN), header


def test_configs_refuse_unusable_tokens_and_never_show_one() -> None:
    for config in (
        ControllerConfig(control_token=TOKEN),
        WorkerConfig(model_path="/models/tiny", control_token=TOKEN),
        GatewayConfig(control_token=TOKEN),
    ):
        assert TOKEN not in repr(config)
    for bad in ("", "two words", "caf\u00e9", "line\nbreak"):
        with pytest.raises(ValueError, match="control_token"):
            ControllerConfig(control_token=bad)


def test_a_gateway_refuses_a_key_file_that_lists_the_control_token(tmp_path: Path) -> None:
    keys = tmp_path / "keys.jsonl"
    keys.write_text(json.dumps({"key": TOKEN, "name": "oops"}) + "\n")
    with pytest.raises(ValueError, match="control token"):
        create_gateway(GatewayConfig(api_keys_file=str(keys), control_token=TOKEN))
