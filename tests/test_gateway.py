"""The gateway in front of the real stack (controller + two tiny-model workers + gateway, as
processes, started once for the module): the official `openai` client, the engine's offline
output, bad input, disconnects, metrics, OpenAPI fuzzing with schemathesis, and fail-over when
a worker is killed (last, as it kills one)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from fuzzing import fuzz_openapi
from servers import (
    ServerProcess,
    controller_process,
    gateway_process,
    metric,
    start_all,
    wait_until,
    worker_process,
)

ENGINE = {"kv_cache_memory": 16 << 20, "max_model_len": 256}
MAX_TOKENS_LIMIT = 240
MAX_BODY = 64 << 10
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


@dataclass
class Stack:
    controller: ServerProcess
    workers: list[ServerProcess]
    gateway: ServerProcess
    model_path: Path

    @property
    def url(self) -> str:
        return self.gateway.url

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kwargs
        )


@pytest.fixture(scope="module")
def stack(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("gateway")
    with controller_process(log_dir, health_check_interval=1).start() as ctl:
        workers = [
            worker_process(
                log_dir, tiny_llama, ctl.url, model_names="tiny", heartbeat_interval=1, **ENGINE
            )
            for _ in range(2)
        ]
        gateway = gateway_process(
            log_dir,
            ctl.url,
            max_tokens_limit=MAX_TOKENS_LIMIT,
            max_body_bytes=MAX_BODY,
            routing_refresh_interval=0.5,
            breaker_cooldown=30,
        )
        try:
            start_all(*workers, gateway)
            wait_until(
                lambda: (
                    len(httpx.get(gateway.url + "/v1/models").json()["data"]) == 1
                    and len(httpx.get(ctl.url + "/workers").json()["workers"]) == 2
                ),
                15,
                what="both workers registered and routed",
            )
            wait_until(
                lambda: routes_to_both(gateway, workers), 30, what="the gateway routes to both"
            )
            yield Stack(ctl, workers, gateway, tiny_llama)
        finally:
            for p in (gateway, *workers):
                p.stop()


def routes_to_both(gateway: ServerProcess, workers: list[ServerProcess]) -> bool:
    """One short request through the gateway; True once every worker has answered one."""
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1}
    httpx.post(gateway.url + "/v1/completions", json=body, timeout=60)
    return all(metric(w.url, "pagedserve_worker_requests_total") > 0 for w in workers)


def chats_served(stack: Stack) -> list[float]:
    """Each worker's count of chat completions run."""
    route = "/v1/chat/completions"
    return [metric(w.url, "pagedserve_worker_requests_total", route=route) for w in stack.workers]


def idle(w: ServerProcess) -> bool:
    """No request in flight on the worker and every KV block back in the pool."""
    return (
        httpx.get(w.url + "/ready", timeout=5).json()["in_flight"] == 0
        and metric(w.url, "pagedserve_worker_requests_running") == 0
        and metric(w.url, "pagedserve_worker_kv_blocks_used") == 0
    )


def aborted(stack: Stack) -> float:
    return sum(
        metric(w.url, "pagedserve_worker_requests_total", outcome="aborted")
        for w in stack.workers
        if w.alive
    )


# -- the official client -------------------------------------------------------------------------


def test_models_list_names_each_model_of_ready_workers_with_owner_and_context(
    stack: Stack,
) -> None:
    models = stack.client().models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].owned_by == "pagedserve" and models[0].object == "model"
    assert models[0].max_model_len == 256  # type: ignore[attr-defined]
    assert stack.client().models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        stack.client().models.retrieve("no-such-model")


def test_chat_and_completions_answer_in_openai_shapes(stack: Stack) -> None:
    client = stack.client()
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert abs(chat.created - time.time()) < 60 and chat.model == "tiny"
    assert chat.system_fingerprint and chat.system_fingerprint.startswith("fp_")
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 6
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    done = client.completions.create(model="tiny", prompt=["One", "Two"], max_tokens=4, n=2)
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert sorted(c.index for c in done.choices) == [0, 1, 2, 3]
    assert done.usage is not None and done.usage.completion_tokens <= 16
    assert done.system_fingerprint == chat.system_fingerprint


def test_streams_end_with_done_and_carry_usage_when_asked(stack: Stack) -> None:
    client = stack.client()
    args = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(**args)
    assert streamed == whole.choices[0].message.content  # greedy: the same text

    # raw bytes: Server-Sent Events ending in [DONE], with the request id header
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True}
    r = httpx.post(stack.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n") and r.headers["x-request-id"]
    assert all(
        json.loads(e[6:])["object"] == "text_completion" for e in r.text.strip().split("\n\n")[:-1]
    )


def test_n_choices_stream_and_collect(stack: Stack) -> None:
    client = stack.client()
    chat = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=5, n=3, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) > 1  # each choice its own seed
    chunks = list(
        client.completions.create(model="tiny", prompt="Hi", max_tokens=4, n=2, stream=True)
    )
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_stop_strings_end_the_answer(stack: Stack) -> None:
    client = stack.client()
    args = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    full = client.completions.create(**args).choices[0].text
    # two characters of the answer's second half, not blank, that first occur past its start
    pairs = (full[i : i + 2] for i in range(len(full) // 2, len(full) - 1))
    stop = next((p for p in pairs if p.strip() and full.index(p) > 0), None)
    assert stop is not None, f"no usable stop string in {full!r}"
    cut = client.completions.create(**args, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_a_seed_makes_sampling_reproducible_whichever_worker_answers(stack: Stack) -> None:
    client = stack.client()
    args = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0}
    before = chats_served(stack)
    first = [client.chat.completions.create(**args, seed=1234) for _ in range(4)]
    texts = {c.choices[0].message.content for c in first}
    assert len(texts) == 1  # four requests, one answer

    def all_four_counted() -> list[float] | None:
        now = chats_served(stack)
        return now if sum(now) >= sum(before) + 4 else None

    after = wait_until(all_four_counted, 10, what="the four chats counted by the workers")
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)  # each answered
    others = {
        client.chat.completions.create(**args, seed=s).choices[0].message.content for s in (1, 2)
    }
    assert others != texts


def test_greedy_output_through_the_gateway_equals_the_engine_offline(stack: Stack) -> None:
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.sampling_params import SamplingParams

    llm = LLM(str(stack.model_path), **ENGINE)
    tok = llm.tokenizer
    chat_prompt = tok.encode(
        tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    greedy = SamplingParams(temperature=0, max_tokens=20)
    offline_chat, offline_text = (
        o.outputs[0].text
        for o in llm.generate([chat_prompt, "The quick brown fox"], greedy, use_tqdm=False)
    )
    client = stack.client()
    chat = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=20, temperature=0
    )
    assert chat.choices[0].message.content == offline_chat
    text = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=20, temperature=0
    )
    assert text.choices[0].text == offline_text


def test_logprobs_and_penalties_reach_the_worker_and_its_answer_comes_back(
    stack: Stack,
) -> None:
    """logprobs and penalties are validated (types, ranges) by the gateway and done by the
    worker's engine: the official client gets them back."""
    client = stack.client()
    chat = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    completion = client.completions.create(
        model="tiny",
        prompt="The sun",
        max_tokens=3,
        logprobs=2,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"5": 1.0},
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 3
    assert len(logprobs.top_logprobs or []) == 3
    with pytest.raises(openai.BadRequestError) as bad:  # out of OpenAI's range: the gateway says
        stack.client().chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=21
        )
    assert bad.value.body["param"] == "top_logprobs"  # type: ignore[index]


# -- request ids, logs and metrics ---------------------------------------------------------------


def test_request_ids_come_back_in_a_header_and_the_access_log(stack: Stack) -> None:
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
    mine = httpx.post(
        stack.url + "/v1/completions", json=body, headers={"X-Request-Id": "my-id-42"}, timeout=60
    )
    assert mine.headers["x-request-id"] == "my-id-42"
    fresh = httpx.post(stack.url + "/v1/completions", json=body, timeout=60)
    assert re.fullmatch(r"req-[0-9a-f]{32}", fresh.headers["x-request-id"])
    bogus = httpx.post(
        stack.url + "/v1/completions", json=body, headers={"X-Request-Id": "a b\tc"}, timeout=60
    )
    assert bogus.headers["x-request-id"].startswith("req-")

    def logged() -> dict | None:
        for line in stack.gateway.log_path.read_text().splitlines():
            if '"request_id":"my-id-42"' in line:
                return json.loads(line[line.index("{") :])
        return None

    entry = wait_until(logged, 5, what="access log line")
    assert (
        entry["status"] == 200 and entry["model"] == "tiny" and entry["path"] == "/v1/completions"
    )
    assert entry["worker"] in {w.url for w in stack.workers}
    assert entry["prompt_tokens"] > 0 and entry["completion_tokens"] == 2


def test_metrics_count_requests_latency_ttft_and_tokens(stack: Stack) -> None:
    client = stack.client()
    before = metric(stack.url, "pagedserve_gateway_requests_total", model="tiny", status="200")
    tokens = metric(stack.url, "pagedserve_gateway_completion_tokens_total", model="tiny")
    client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
    list(client.completions.create(model="tiny", prompt="Hi", max_tokens=3, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="unknown-model", prompt="Hi")

    def counted() -> bool:
        return (
            metric(stack.url, "pagedserve_gateway_requests_total", model="tiny", status="200")
            == before + 2
        )

    wait_until(counted, 5, what="requests counted")
    assert metric(stack.url, "pagedserve_gateway_requests_total", model="-", status="404") >= 1
    assert (
        metric(stack.url, "pagedserve_gateway_completion_tokens_total", model="tiny") >= tokens + 6
    )
    assert metric(stack.url, "pagedserve_gateway_prompt_tokens_total", model="tiny") > 0
    assert metric(stack.url, "pagedserve_gateway_request_latency_seconds_count", model="tiny") >= 2
    assert metric(stack.url, "pagedserve_gateway_time_to_first_token_seconds_count") >= 1
    text = httpx.get(stack.url + "/metrics").text
    for name in ("retries_total", "rate_limited_total", "requests_in_flight", "open_circuits"):
        assert f"pagedserve_gateway_{name}" in text
    health = httpx.get(stack.url + "/health").json()
    assert health == {
        "status": "ok",
        "controller": "ok",
        "models": 1,
        "pid": stack.gateway.proc.pid,
    }


# -- bad input -------------------------------------------------------------------------------------

CHAT_OK = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", b'["a", "list"]', 400, None),
        ("/v1/chat/completions", {"messages": CHAT_OK["messages"]}, 400, "model"),
        ("/v1/chat/completions", {**CHAT_OK, "model": 7}, 400, "model"),
        ("/v1/chat/completions", {**CHAT_OK, "model": "no-such-model"}, 404, "model"),
        ("/v1/chat/completions", {**CHAT_OK, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {**CHAT_OK, "messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "robot", "content": "x"}]},
         400, "messages[0].role"),
        ("/v1/chat/completions", {**CHAT_OK, "messages": [{"content": "x"}]}, 400,
         "messages[0].role"),
        ("/v1/chat/completions", {**CHAT_OK, "temperature": "warm"}, 400, "temperature"),
        ("/v1/chat/completions", {**CHAT_OK, "temperature": -1}, 400, "temperature"),
        ("/v1/chat/completions", {**CHAT_OK, "top_p": 7}, 400, "top_p"),
        ("/v1/chat/completions", {**CHAT_OK, "max_tokens": -5}, 400, "max_tokens"),
        ("/v1/chat/completions", {**CHAT_OK, "max_tokens": 10**12}, 400, "max_tokens"),
        ("/v1/chat/completions", {**CHAT_OK, "n": 0}, 400, "n"),
        ("/v1/chat/completions", {**CHAT_OK, "n": 10**6}, 400, "n"),
        ("/v1/chat/completions", {**CHAT_OK, "stream": "yes"}, 400, "stream"),
        ("/v1/chat/completions", {**CHAT_OK, "stop": [""]}, 400, "stop"),
        ("/v1/chat/completions", {**CHAT_OK, "stream_options": {"include_usage": True}}, 400,
         None),
        ("/v1/chat/completions", {**CHAT_OK, "presence_penalty": 9}, 400, "presence_penalty"),
        ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [3, -1]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [99999]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [[2**70]]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi " * 400}, 400, None),
        ("/v1/completions", {"model": "tiny", "prompt": "x" * (MAX_BODY + 1)}, 413, None),
    ],
)  # fmt: skip
def test_bad_input_gets_openai_status_and_error_object_and_leaves_workers_alone(
    stack: Stack, path: str, body: object, status: int, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        stack.url + path,
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert r.headers["x-request-id"]
    assert all(idle(w) for w in stack.workers)


def test_unknown_routes_and_methods_answer_openai_errors(stack: Stack) -> None:
    r = httpx.get(stack.url + "/v1/engines")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.delete(stack.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


# -- disconnects -----------------------------------------------------------------------------------


def test_a_client_leaving_mid_stream_aborts_the_request_and_frees_its_blocks(stack: Stack) -> None:
    before = aborted(stack)
    body = {"model": "tiny", "prompt": "Tell me", "max_tokens": 240, "ignore_eos": True}
    with httpx.stream(
        "POST", stack.url + "/v1/completions", json={**body, "stream": True, "n": 2}, timeout=60
    ) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:
                break  # leave: closing the response drops the connection
    # n=2: one engine request holds both choices
    wait_until(lambda: aborted(stack) >= before + 1, 10, what="both choices aborted")
    wait_until(lambda: all(idle(w) for w in stack.workers), 10, what="blocks freed")


def test_a_client_giving_up_on_a_whole_answer_aborts_it_too(stack: Stack) -> None:
    before = aborted(stack)
    body = {"model": "tiny", "prompt": "Tell me", "max_tokens": 240, "ignore_eos": True, "n": 8}
    payload = json.dumps(body).encode()
    # A raw connection, closed once a worker runs the request: mid-generation, however fast
    # the engine is (a client-side timeout would race the answer).
    with socket.create_connection(("127.0.0.1", stack.gateway.port)) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        wait_until(
            lambda: any(metric(w.url, "pagedserve_worker_requests_running") for w in stack.workers),
            10, interval=0.005, what="the request running on a worker",
        )  # fmt: skip
    # n=8: one engine request holds every choice
    wait_until(lambda: aborted(stack) >= before + 1, 10, what="all choices aborted")
    wait_until(lambda: all(idle(w) for w in stack.workers), 10, what="blocks freed")


# -- the prompt-token limit -------------------------------------------------------------------------


def test_prompts_over_the_token_limit_are_counted_by_a_worker_and_refused(stack: Stack) -> None:
    with gateway_process(
        stack.gateway.log_path.parent, stack.controller.url, max_prompt_tokens=12
    ).start() as gateway:
        url = gateway.url + "/v1/completions"
        short = httpx.post(url, json={"model": "tiny", "prompt": "Hi there", "max_tokens": 1})
        assert short.status_code == 200
        # 26 bytes could be 26 tokens: a worker counts them (8) and the prompt goes through
        merged = httpx.post(
            url, json={"model": "tiny", "prompt": "Once upon a time there was", "max_tokens": 1}
        )
        assert merged.status_code == 200, merged.text
        long = httpx.post(url, json={"model": "tiny", "prompt": "Hello, world! " * 10})
        assert long.status_code == 400 and long.json()["error"]["code"] == "prompt_too_long"
        ids = httpx.post(url, json={"model": "tiny", "prompt": list(range(13))})
        assert ids.status_code == 400 and ids.json()["error"]["param"] == "prompt"


# -- the OpenAPI schema, fuzzed ----------------------------------------------------------------------


_CHAT = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4}
_TEXT = {"model": "tiny", "prompt": ["Hi", "Yo"], "max_tokens": 4, "n": 2}
_USAGE = {"stream": True, "stream_options": {"include_usage": True}}
KNOWN_GOOD = {
    "/v1/chat/completions": [_CHAT, {**_CHAT, **_USAGE, "n": 2}],
    "/v1/completions": [_TEXT, {**_TEXT, **_USAGE}, {**_TEXT, "prompt": "x", "stream": True}],
}


def _fuzz(stack: Stack, examples: int) -> None:
    """Schemathesis cases for every operation, positive and negative: no 5xx, and every answer
    matches the schema (status, content type, body)."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    spec = httpx.get(stack.url + "/openapi.json").json()
    aim_at_models(spec, ["tiny", "tiny", "missing"])
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    fuzz_openapi(stack.url, spec, examples, checks, KNOWN_GOOD)
    assert all(idle(w) for w in stack.workers if w.alive)


def aim_at_models(spec: dict, models: list[str]) -> None:
    """Aim most generated requests at a model that exists, so that they reach a worker."""
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        spec["components"]["schemas"][name]["properties"]["model"] = {
            "type": "string",
            "enum": models,
        }


def test_schemathesis_finds_no_server_errors_or_schema_violations(stack: Stack) -> None:
    _fuzz(stack, examples=15)


@pytest.mark.slow
def test_schemathesis_long_run(stack: Stack) -> None:
    _fuzz(stack, examples=300)


# -- fail-over (last: it kills a worker) -----------------------------------------------------------


def test_requests_keep_succeeding_when_a_worker_is_killed(stack: Stack) -> None:
    client = stack.client()
    retries = metric(stack.url, "pagedserve_gateway_retries_total")
    stack.workers[1].kill()  # no goodbye: the controller still lists it for a while
    for i in range(8):
        chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        assert chat.choices[0].message.content is not None, i
    assert metric(stack.url, "pagedserve_gateway_retries_total", reason="connect") > retries
    assert metric(stack.url, "pagedserve_gateway_open_circuits") >= 1  # skipped from now on
    served = []
    for _ in range(4):
        r = httpx.post(stack.url + "/v1/chat/completions", json=CHAT_OK, timeout=60)
        assert r.status_code == 200
        served.append(r)
    assert idle(stack.workers[0])
