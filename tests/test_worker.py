"""One model worker as a real process (tiny random Llama): FastChat's worker protocol, OpenAI's
API, bad input, disconnects, metrics and draining."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import ServerProcess, controller_process, wait_until, worker_process

ENGINE = {"kv_cache_memory": 16 << 20, "max_model_len": 256}


@pytest.fixture(scope="module")
def worker(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("worker")
    with worker_process(
        log_dir, tiny_llama, None, model_names="tiny,tiny-alias", **ENGINE
    ).start() as w:
        yield w


def post(w: ServerProcess, path: str, body: object) -> httpx.Response:
    return httpx.post(w.url + path, json=body, timeout=30)


def frames(raw: bytes) -> list[dict]:
    assert raw.endswith(b"\0")
    return [json.loads(f) for f in raw.split(b"\0") if f]


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


def idle(w: ServerProcess) -> bool:
    """No request in flight and every KV block back in the pool."""
    ready = httpx.get(w.url + "/ready", timeout=5).json()
    used = metric(w, "pagedserve_worker_kv_blocks_used")
    return ready["in_flight"] == 0 and used == 0


def metric(w: ServerProcess, name: str) -> float:
    for line in httpx.get(w.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


# -- FastChat's worker protocol ------------------------------------------------------------------


def test_status_details_and_templates_keep_fastchat_shapes(worker: ServerProcess) -> None:
    assert httpx.get(worker.url + "/health").json()["status"] == "ok"
    assert httpx.get(worker.url + "/ready").json()["ready"] is True
    status = post(worker, "/worker_get_status", None).json()
    assert status["model_names"] == ["tiny", "tiny-alias"]
    assert status["speed"] == 1 and status["queue_length"] == 0
    assert status["state"] == "ready" and status["worker_id"]
    assert post(worker, "/model_details", {"model": "tiny"}).json() == {"context_length": 256}
    count = post(worker, "/count_token", {"model": "tiny", "prompt": "hello world"}).json()
    assert count["error_code"] == 0 and count["count"] > 0
    conv = post(worker, "/worker_get_conv_template", {"model": "tiny"}).json()["conv"]
    fastchat_fields = {
        "name", "system_template", "system_message", "roles", "messages", "offset",
        "sep_style", "sep", "sep2", "stop_str", "stop_token_ids",
    }  # fmt: skip
    assert set(conv) == fastchat_fields
    assert conv["sep_style"] == 9 and conv["roles"][0] == "<|im_start|>user"  # ChatML


def test_generate_stream_frames_are_cumulative_and_nul_delimited(worker: ServerProcess) -> None:
    body = {"model": "tiny", "prompt": "The sun", "max_new_tokens": 8, "temperature": 0}
    with httpx.stream("POST", worker.url + "/worker_generate_stream", json=body, timeout=30) as r:
        assert r.status_code == 200
        got = frames(r.read())
    texts = [f["text"] for f in got]
    assert all(t.startswith("The sun") for t in texts)  # echo defaults to true, as FastChat's
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert all(f["error_code"] == 0 for f in got)
    assert got[-1]["finish_reason"] == "length" and got[-2]["finish_reason"] is None
    assert got[-1]["usage"]["completion_tokens"] == 8
    assert got[-1]["usage"]["total_tokens"] == got[-1]["usage"]["prompt_tokens"] + 8

    final = post(worker, "/worker_generate", {**body, "echo": False}).json()
    assert final["text"] == texts[-1][len("The sun") :]  # greedy: the same text
    assert final["finish_reason"] == "length" and final["error_code"] == 0


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        ({"prompt": ""}, 400, 40302, "empty"),
        ({"prompt": "hi", "max_new_tokens": -5}, 400, 40001, "max_new_tokens"),
        ({"prompt": "hi", "temperature": -1}, 400, 40001, "temperature"),
        ({"prompt": "hi", "top_p": 3}, 400, 40001, "top_p"),
        ({"prompt": "hi", "top_k": -7}, 400, 40001, "top_k"),
        ({"prompt": "hi", "presence_penalty": 5}, 400, 40302, "presence_penalty"),
        ({"prompt": "hi", "use_beam_search": True, "best_of": 2}, 400, 40302, "temperature"),
        ({"prompt": "hi", "stop": [""]}, 400, 40302, "stop"),
        ({"prompt": "hi " * 400}, 400, 40303, "maximum context length"),
        ({"prompt": "hi", "model": "no-such-model"}, 404, 40301, "no-such-model"),
        ({"max_new_tokens": 4}, 400, 40001, "prompt"),
        (["not", "an", "object"], 400, 40001, "body"),
    ],
)
@pytest.mark.parametrize("path", ["/worker_generate_stream", "/worker_generate"])
def test_bad_generate_params_get_a_4xx_with_fastchat_error_fields(
    worker: ServerProcess, path: str, body: object, status: int, code: int, says: str
) -> None:
    r = post(worker, path, body)
    assert r.status_code == status, r.text
    payload = json.loads(r.content.rstrip(b"\0"))
    assert payload["error_code"] == code and says in payload["text"]
    assert r.content.endswith(b"\0") == (path == "/worker_generate_stream")
    assert idle(worker)


# -- OpenAI's API ----------------------------------------------------------------------------------


def test_models_completions_and_chat_answer_in_openai_shapes(worker: ServerProcess) -> None:
    models = httpx.get(worker.url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny", "tiny-alias"]

    r = post(
        worker,
        "/v1/completions",
        {"model": "tiny-alias", "prompt": ["One", "Two"], "max_tokens": 4, "n": 2, "seed": 1},
    )
    body = r.json()
    assert (
        r.status_code == 200
        and body["object"] == "text_completion"
        and body["id"].startswith("cmpl-")
    )
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2, 3]
    assert {c["finish_reason"] for c in body["choices"]} <= {"length", "stop"}
    assert body["usage"]["completion_tokens"] <= 16
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )

    echoed = post(
        worker,
        "/v1/completions",
        {"model": "tiny", "prompt": "Echo me", "max_tokens": 2, "echo": True},
    ).json()
    assert echoed["choices"][0]["text"].startswith("Echo me")

    chat = post(
        worker,
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "temperature": 0,
        },
    ).json()
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(chat["choices"][0]["message"]["content"], str)
    assert chat["usage"]["completion_tokens"] <= 5


def test_streams_are_server_sent_events_ending_with_done(worker: ServerProcess) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = post(worker, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "created" in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    whole = post(
        worker, "/v1/chat/completions", {**body, "stream": False, "stream_options": None}
    ).json()
    assert streamed == whole["choices"][0]["message"]["content"]

    r = post(
        worker,
        "/v1/completions",
        {"model": "tiny", "prompt": "abc", "max_tokens": 3, "stream": True},
    )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"
    assert "usage" not in last  # no include_usage: no usage field


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model",
        ),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0},
            400,
            "n",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x " * 300}]},
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "stream_options": {"include_usage": True},
            },
            400,
            None,
        ),
        ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": -0.5}, 400, "top_p"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "x", "frequency_penalty": 3.0},
            400,
            "frequency_penalty",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "x", "logit_bias": {"not-a-token": 5}},
            400,
            "logit_bias",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "x", "use_beam_search": True, "best_of": 2},
            400,
            None,
        ),
        ("/v1/completions", {"model": "tiny", "prompt": [99999]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ],
)
def test_bad_openai_requests_get_openai_error_objects(
    worker: ServerProcess, path: str, body: dict, status: int, param: str | None
) -> None:
    r = post(worker, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert idle(worker)


# -- logprobs, n, penalties, beam search -----------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Tell me about the sun"}]


@pytest.fixture(scope="module")
def offline(tiny_llama: Path) -> Iterator[object]:
    from pagedserve.engine.llm import LLM

    llm = LLM(str(tiny_llama), **ENGINE)
    yield llm
    llm.shutdown()


def offline_logprobs(llm: object, prompt_ids: list[int], stop_ids: list[int]) -> tuple[list, list]:
    from pagedserve.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=5, logprobs=3, stop_token_ids=stop_ids)
    out = llm.generate([prompt_ids], params, use_tqdm=False)[0].outputs[0]  # type: ignore[attr-defined]
    return out.token_ids, out.logprobs


def engine_requests(w: ServerProcess, route: str) -> float:
    total = 0.0
    for line in httpx.get(w.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("pagedserve_worker_requests_total{") and f'route="{route}"' in line:
            total += float(line.split()[-1])
    return total


def expected_top(entry: dict[int, float]) -> list[float]:
    return sorted(entry.values(), reverse=True)[:3]


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_equal_the_engines_offline_logprobs(
    worker: ServerProcess, offline: object, stream: bool
) -> None:
    tok = offline.tokenizer  # type: ignore[attr-defined]
    ids, logprobs = offline_logprobs(offline, tok.encode("The sun"), [])
    body = {
        "model": "tiny", "prompt": "The sun", "max_tokens": 5, "temperature": 0,
        "logprobs": 3, "stream": stream,
    }  # fmt: skip
    r = post(worker, "/v1/completions", body)
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]
        parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
        got = {k: [x for p in parts for x in p[k]] for k in parts[0]}
        text = "".join(c["choices"][0]["text"] for c in chunks)
    else:
        got = r.json()["choices"][0]["logprobs"]
        text = r.json()["choices"][0]["text"]
    assert len(got["tokens"]) == len(ids) == 5
    assert got["token_logprobs"] == pytest.approx(
        [e[t] for t, e in zip(ids, logprobs, strict=True)], abs=1e-4
    )
    for top, entry in zip(got["top_logprobs"], logprobs, strict=True):
        assert sorted(top.values(), reverse=True) == pytest.approx(expected_top(entry), abs=1e-4)
    assert got["text_offset"][0] == 0
    assert all(b >= a for a, b in zip(got["text_offset"], got["text_offset"][1:], strict=False))
    assert "".join(got["tokens"]).strip() == text.strip()
    assert idle(worker)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_the_engines_offline_logprobs(
    worker: ServerProcess, offline: object, stream: bool
) -> None:
    from pagedserve.engine.chat_templates import resolve_chat_template

    tok = offline.tokenizer  # type: ignore[attr-defined]
    template = resolve_chat_template(tok, "tiny")
    prompt = tok.encode(template.render(MESSAGES, True), add_special_tokens=False)
    ids, logprobs = offline_logprobs(offline, prompt, template.stop_token_ids)
    body = {
        "model": "tiny", "messages": MESSAGES, "max_tokens": 5, "temperature": 0,
        "logprobs": True, "top_logprobs": 3, "stream": stream,
    }  # fmt: skip
    r = post(worker, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]
        content = [
            x
            for c in chunks
            if c["choices"][0].get("logprobs")
            for x in c["choices"][0]["logprobs"]["content"]
        ]
    else:
        assert r.json()["usage"]["prompt_tokens"] == len(prompt)
        content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == len(ids)
    assert [c["logprob"] for c in content] == pytest.approx(
        [e[t] for t, e in zip(ids, logprobs, strict=True)], abs=1e-4
    )
    for c, entry in zip(content, logprobs, strict=True):
        assert set(c) == {"token", "logprob", "bytes", "top_logprobs"}
        assert c["bytes"] == list(c["token"].encode())
        assert len(c["top_logprobs"]) == 3
        got = [t["logprob"] for t in c["top_logprobs"]]
        assert got == pytest.approx(expected_top(entry), abs=1e-4)
    assert idle(worker)


def test_n_choices_come_from_one_engine_request(worker: ServerProcess) -> None:
    before = engine_requests(worker, "/v1/completions")
    body = {"model": "tiny", "prompt": "The sun", "max_tokens": 6, "n": 3, "seed": 7}
    r = post(worker, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert engine_requests(worker, "/v1/completions") == before + 1
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 18  # summed over the choices
    assert post(worker, "/v1/completions", body).json()["choices"] == choices  # seeded

    two = post(worker, "/v1/completions", {**body, "prompt": ["The sun", "A cat"], "n": 2})
    assert two.status_code == 200, two.text
    assert sorted(c["index"] for c in two.json()["choices"]) == [0, 1, 2, 3]
    assert two.json()["usage"]["completion_tokens"] == 24

    stream = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "n": 3, "seed": 7}
    r = post(worker, "/v1/chat/completions", {**stream, "stream": True})
    chunks = [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2]
    assert idle(worker)


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama: Path) -> object:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def penalized_greedy(
    hf: object,
    prompt: list[int],
    steps: int,
    stop_ids: tuple[int, ...] = (),
    *,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: dict[str, float] | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy decoding on transformers' forward pass, with logit_bias, transformers'
    RepetitionPenaltyLogitsProcessor (prompt and output) and OpenAI's frequency and presence
    penalties (output only), in vLLM's order: the tokens and each one's logprob after them."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    repetition = RepetitionPenaltyLogitsProcessor(repetition_penalty)
    ids, out, logprobs = list(prompt), [], []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[:, -1].float()  # type: ignore[operator]
        for token, bias in (logit_bias or {}).items():
            logits[0, int(token)] += bias
        row = repetition(torch.tensor([ids]), logits)[0]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=row.shape[-1])
        row = row - frequency_penalty * counts - presence_penalty * (counts > 0).float()
        row = torch.log_softmax(row, dim=-1)
        token = int(row.argmax())
        ids.append(token)
        out.append(token)
        logprobs.append(row[token].item())
        if token in stop_ids:
            break
    return out, logprobs


def assert_penalty_matters(hf: object, prompt: list[int], steps: int, want: list[float], **kw):
    """The case is worth asking: the penalty moves some logprob of the reference by > 0.1."""
    plain = penalized_greedy(hf, prompt, steps, **kw)[1]
    assert max(abs(a - b) for a, b in zip(plain, want, strict=False)) > 0.1


@pytest.mark.parametrize(
    "penalty",
    [
        {"presence_penalty": 2.0},  # token 25 comes twice in the plain answer: its 2nd is hit
        {"presence_penalty": 1.5, "frequency_penalty": -2.0},  # one token repeats: counts matter
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.7},  # below 1: seen tokens pulled up, the answer changes
        {"logit_bias": {"5": 10.0, "17": -100}},
    ],
    ids=["presence", "presence+frequency", "repetition", "repetition<1", "logit_bias"],
)
def test_penalties_and_logit_bias_change_the_completion_as_transformers_does(
    worker: ServerProcess, offline: object, hf_tiny: object, penalty: dict
) -> None:
    tok = offline.tokenizer  # type: ignore[attr-defined]
    prompt = tok.encode("The sun")
    ids, want = penalized_greedy(hf_tiny, prompt, 8, **penalty)
    assert_penalty_matters(hf_tiny, prompt, 8, want)
    body = {
        "model": "tiny", "prompt": "The sun", "max_tokens": 8, "temperature": 0,
        "ignore_eos": True, "logprobs": 0, **penalty,
    }  # fmt: skip
    r = post(worker, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    # (the detokenizer holds back a last token that ends in half a UTF-8 character)
    assert choice["text"] == tok.decode(ids).removesuffix("\ufffd")
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-4)
    assert idle(worker)


def test_chat_and_fastchat_routes_apply_penalties_as_transformers_does(
    worker: ServerProcess, offline: object, hf_tiny: object
) -> None:
    from pagedserve.engine.chat_templates import resolve_chat_template

    tok = offline.tokenizer  # type: ignore[attr-defined]
    eos = (tok.eos_token_id,)
    prompt = tok.encode("The sun")
    for penalty in (
        {"presence_penalty": 1.5, "frequency_penalty": -2.0},
        {"presence_penalty": 0.5, "repetition_penalty": 0.7},
    ):
        ids, want = penalized_greedy(hf_tiny, prompt, 6, eos, **penalty)
        plain_ids, _ = penalized_greedy(hf_tiny, prompt, 6, eos)
        assert ids != plain_ids  # the penalty changes the answer itself
        body = {"prompt": "The sun", "max_new_tokens": 6, "temperature": 0, "echo": False}
        r = post(worker, "/worker_generate", {**body, **penalty, "logprobs": 0})
        assert r.status_code == 200 and r.json()["error_code"] == 0, r.text
        assert r.json()["text"] == tok.decode(ids, skip_special_tokens=True).removesuffix("\ufffd")
        assert r.json()["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-4)

    template = resolve_chat_template(tok, "tiny")
    chat_prompt = tok.encode(template.render(MESSAGES, True), add_special_tokens=False)
    penalty = {"presence_penalty": 1.0, "repetition_penalty": 0.7}  # the template's tokens too
    stops = tuple(template.stop_token_ids)
    ids, want = penalized_greedy(hf_tiny, chat_prompt, 5, stops, **penalty)
    assert_penalty_matters(hf_tiny, chat_prompt, 5, want, stop_ids=stops)
    chat = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "temperature": 0,
            "logprobs": True, **penalty}  # fmt: skip
    r = post(worker, "/v1/chat/completions", chat)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(want, abs=1e-4)
    assert idle(worker)


def test_a_logit_bias_of_100_forces_its_token_and_degenerate_logprobs_stay_json(
    worker: ServerProcess,
) -> None:
    plain = {"model": "tiny", "prompt": "The sun", "max_tokens": 6, "temperature": 0}
    forced = post(worker, "/v1/completions", {**plain, "logit_bias": {"42": 100}, "logprobs": 0})
    assert forced.status_code == 200, forced.text
    logprobs = forced.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 6 and len(set(logprobs["tokens"])) == 1
    assert all(lp > -1e-3 for lp in logprobs["token_logprobs"])  # certain, after the bias
    # a degenerate penalty makes logprobs NaN or -inf: they still come back as JSON numbers
    odd = {**plain, "repetition_penalty": 5e-324, "logprobs": 2}
    r = post(worker, "/v1/completions", odd)
    assert r.status_code == 200, r.text
    assert all(isinstance(x, float) for x in r.json()["choices"][0]["logprobs"]["token_logprobs"])
    lp = post(
        worker,
        "/worker_generate",
        {"prompt": "The sun", "max_new_tokens": 4, "temperature": 0, "logprobs": 2, "echo": False},
    ).json()
    assert len(lp["logprobs"]["tokens"]) == 4 and len(lp["logprobs"]["top_logprobs"][0]) == 2
    assert idle(worker)


def test_beam_search_returns_n_choices(worker: ServerProcess) -> None:
    body = {
        "model": "tiny", "prompt": "The sun", "max_tokens": 5, "temperature": 0,
        "use_beam_search": True, "best_of": 3, "n": 2,
    }  # fmt: skip
    r = post(worker, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    chat = {k: v for k, v in body.items() if k != "prompt"} | {"messages": MESSAGES}
    r = post(worker, "/v1/chat/completions", chat)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
    fastchat = {"prompt": "The sun", "max_new_tokens": 4, "temperature": 0}
    r = post(worker, "/worker_generate", {**fastchat, "use_beam_search": True, "best_of": 2})
    assert r.status_code == 200 and r.json()["error_code"] == 0, r.text
    assert idle(worker)


def test_chat_template_flag_renders_fastchats_vicuna_format(
    tiny_llama: Path, tmp_path: Path
) -> None:
    with worker_process(
        tmp_path, tiny_llama, None, model_names="tiny", chat_template="vicuna_v1.1", **ENGINE
    ).start() as w:
        conv = post(w, "/worker_get_conv_template", {}).json()["conv"]
        assert conv["name"] == "vicuna_v1.1" and conv["sep_style"] == 2
        assert conv["roles"] == ["USER", "ASSISTANT"] and conv["sep2"] == "</s>"
        r = post(
            w,
            "/v1/chat/completions",
            {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        from transformers import AutoTokenizer

        from pagedserve.engine.chat_templates import BUILTIN_TEMPLATES

        tok = AutoTokenizer.from_pretrained(str(tiny_llama))
        text = BUILTIN_TEMPLATES["vicuna_v1.1"].get_prompt(None, ["Tell me about the sun", None])
        assert text.endswith("USER: Tell me about the sun ASSISTANT:")
        assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(text))  # with BOS
        bad = post(
            w,
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]},
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


def test_malformed_json_is_a_400_not_a_500(worker: ServerProcess) -> None:
    for path in ("/v1/completions", "/worker_generate_stream"):
        r = httpx.post(
            worker.url + path, content=b"{oops", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/completions",
            {
                "model": "tiny",
                "prompt": "Go",
                "max_tokens": 240,
                "ignore_eos": True,
                "stream": True,
            },
        ),
        (
            "/v1/chat/completions",
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "Go"}],
                "n": 2,
                "max_tokens": 200,
                "ignore_eos": True,
                "stream": True,
            },
        ),
        ("/worker_generate_stream", {"prompt": "Go", "max_new_tokens": 240}),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "Go", "max_tokens": 240, "ignore_eos": True},
        ),
    ],
)
def test_a_client_that_goes_away_frees_its_kv_blocks(
    worker: ServerProcess, path: str, body: dict
) -> None:
    started = threading.Event()

    def client() -> None:
        try:
            with httpx.stream(
                "POST", worker.url + path, json=body, timeout=httpx.Timeout(0.5)
            ) as r:
                for _ in r.iter_raw():
                    started.set()
                    return  # close after the first chunk
        except httpx.ReadTimeout:  # the non-streaming request: give up waiting
            started.set()

    t = threading.Thread(target=client)
    t.start()
    t.join(10)
    assert started.is_set()
    wait_until(lambda: idle(worker), 10, what="aborted request freed")
    assert httpx.get(worker.url + "/ready").json()["ready"] is True


def test_metrics_report_the_engine_and_request_timings(worker: ServerProcess) -> None:
    post(worker, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    text = httpx.get(worker.url + "/metrics").text
    for name in (
        "pagedserve_worker_requests_running",
        "pagedserve_worker_requests_waiting",
        "pagedserve_worker_kv_blocks_used",
        "pagedserve_worker_kv_blocks_total",
        "pagedserve_worker_generation_tokens_total",
        "pagedserve_worker_generation_tokens_per_second",
        "pagedserve_worker_time_to_first_token_seconds_bucket",
        "pagedserve_worker_request_latency_seconds_count",
        'pagedserve_worker_requests_total{outcome="ok",route="/v1/completions"}',
    ):
        assert name in text, name
    assert metric(worker, "pagedserve_worker_kv_blocks_total") > 0


def test_metrics_count_prefix_cache_lookups_and_hits(worker: ServerProcess) -> None:
    queried = metric(worker, "pagedserve_worker_prefix_cache_queries_total")
    hits = metric(worker, "pagedserve_worker_prefix_cache_hits_total")
    prompt = "A long shared preamble that fills a few KV blocks of the cache. " * 6
    for question in ("one", "two"):
        body = {"model": "tiny", "prompt": prompt + question, "max_tokens": 1}
        assert post(worker, "/v1/completions", body).status_code == 200
    assert metric(worker, "pagedserve_worker_prefix_cache_queries_total") > queried
    # the second prompt found the first one's full blocks
    assert metric(worker, "pagedserve_worker_prefix_cache_hits_total") >= hits + 16


def test_metrics_show_kv_waste_sharing_and_the_hit_rate_live(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """While two samples of one prompt run, their prompt blocks are shared (copy-on-write) and
    each sequence's last block is part empty: /metrics shows both as they happen. Its own
    worker, with room for 900 tokens: 200 ended between two of the polls on CI."""
    with worker_process(
        tmp_path, tiny_llama, None, model_names="tiny", **{**ENGINE, "max_model_len": 1024}
    ).start() as worker:
        body = {"model": "tiny", "prompt": "The shared prompt of two samples, " * 4, "n": 2,
                "max_tokens": 900, "ignore_eos": True, "temperature": 1.0, "seed": 1}  # fmt: skip
        done = threading.Event()

        def run() -> None:
            try:
                assert post(worker, "/v1/completions", body).status_code == 200
            finally:
                done.set()

        t = threading.Thread(target=run)
        t.start()
        shared, waste = [], []
        while not done.is_set():
            shared.append(metric(worker, "pagedserve_worker_kv_blocks_shared"))
            waste.append(metric(worker, "pagedserve_worker_kv_cache_waste"))
        t.join(30)
        assert max(shared) >= 1, shared
        # (1.0 is right for the moment between a block's allocation and its prefill)
        assert all(0.0 <= w <= 1.0 for w in waste) and any(0.0 < w < 1.0 for w in waste), waste
        queried = metric(worker, "pagedserve_worker_prefix_cache_queries_total")
        hits = metric(worker, "pagedserve_worker_prefix_cache_hits_total")
        assert metric(worker, "pagedserve_worker_prefix_cache_hit_rate") == pytest.approx(
            hits / queried, rel=1e-6
        )


# -- models without a chat template, draining ------------------------------------------------------


def test_a_model_without_chat_template_refuses_chat_with_a_400(
    tiny_llama: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(tiny_llama, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with worker_process(tmp_path, plain, None, **ENGINE).start() as w:
        r = post(
            w,
            "/v1/chat/completions",
            {"model": "plain", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        assert (
            post(
                w, "/v1/completions", {"model": "plain", "prompt": "hi", "max_tokens": 2}
            ).status_code
            == 200
        )
        conv = post(w, "/worker_get_conv_template", {}).json()["conv"]
        assert conv["sep_style"] == 1 and conv["roles"] == ["USER", "ASSISTANT"]


def test_sigterm_drains_in_flight_requests_then_leaves_the_registry(
    tiny_llama: Path, tmp_path: Path
) -> None:
    with (
        controller_process(tmp_path, health_check_interval=0).start() as ctl,
        worker_process(
            tmp_path,
            tiny_llama,
            ctl.url,
            model_names="tiny",
            heartbeat_interval=0.5,
            drain_timeout=20,
            max_num_seqs=1,
            # room for a request that outlasts the checks made while it drains: 200 tokens
            # ended before them on a quiet machine, and the worker had exited
            **{**ENGINE, "max_model_len": 1024},
        ).start() as w,
    ):
        wait_until(
            lambda: httpx.post(ctl.url + "/list_models").json()["models"] == ["tiny"],
            10,
            what="registered",
        )
        result: dict = {}

        def long_request() -> None:
            body = {"model": "tiny", "prompt": "Go", "max_tokens": 1000, "ignore_eos": True}
            result["response"] = httpx.post(w.url + "/v1/completions", json=body, timeout=60)

        t = threading.Thread(target=long_request)
        t.start()
        wait_until(
            lambda: httpx.get(w.url + "/ready").json()["in_flight"] == 1,
            5,
            interval=0.01,
            what="in flight",
        )
        w.signal(signal.SIGTERM)
        wait_until(
            lambda: httpx.get(w.url + "/ready").status_code == 503,
            5,
            interval=0.02,
            what="draining",
        )
        refused = post(w, "/v1/completions", {"model": "tiny", "prompt": "x"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "worker_draining"
        assert (
            httpx.post(ctl.url + "/get_worker_address", json={"model": "tiny"}).json()["address"]
            == ""
        )
        t.join(60)
        done = result["response"].json()
        assert done["choices"][0]["finish_reason"] == "length"  # finished whole, not cut
        assert done["usage"]["completion_tokens"] == 1000
        assert w.wait(timeout=15) == 0
        wait_until(
            lambda: httpx.get(ctl.url + "/workers").json()["workers"] == [], 5, what="unregistered"
        )


def test_drain_timeout_bounds_the_wait(tiny_llama: Path, tmp_path: Path) -> None:
    engine = {**ENGINE, "max_model_len": 1024}  # room for a request that outlasts the timeout
    with worker_process(
        tmp_path, tiny_llama, None, model_names="tiny", drain_timeout=0.5, **engine
    ).start() as w:
        box: dict = {}

        def endless() -> None:
            body = {
                "model": "tiny",
                "prompt": "Go",
                "max_tokens": 1000,
                "ignore_eos": True,
                "stream": True,
            }
            with httpx.stream("POST", w.url + "/v1/completions", json=body, timeout=30) as r:
                box["text"] = r.read().decode()

        t = threading.Thread(target=endless)
        t.start()
        wait_until(
            lambda: httpx.get(w.url + "/ready").json()["in_flight"] == 1,
            5,
            interval=0.01,
            what="in flight",
        )
        start = time.monotonic()
        w.signal(signal.SIGTERM)
        assert w.wait(timeout=15) == 0
        assert time.monotonic() - start < 8
        t.join(10)
        assert not t.is_alive()
        events = sse_events(box["text"])  # the stream ended whole: a last chunk, then [DONE]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"


def test_a_model_that_cannot_load_makes_the_worker_exit_with_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    w = worker_process(tmp_path, missing, None)
    w.start(wait=False)
    assert w.wait(timeout=60) == 1
    assert "failed to load" in w.log_tail()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"host": "0.0.0.0"}, "worker-address"),
        ({"controller_address": "127.0.0.1:21001"}, "controller_address"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"drain_timeout": -1}, "drain_timeout"),
        ({"model_names": ["ok", " "]}, "model_names"),
        ({"port": 0}, "port"),
    ],
)
def test_worker_config_refuses_bad_values(fields: dict, message: str) -> None:
    from pagedserve.worker.config import WorkerConfig

    with pytest.raises(ValueError, match=message):
        WorkerConfig(model_path="/models/m", **fields)


def test_worker_config_defaults_name_and_address() -> None:
    from pagedserve.worker.config import WorkerConfig

    config = WorkerConfig(model_path="/models/vicuna-7b/", port=3000)
    assert config.model_names == ["vicuna-7b"]
    assert config.worker_address == "http://127.0.0.1:3000"
    explicit = WorkerConfig(model_path="m", host="0.0.0.0", worker_address="http://10.0.0.5:3000/")
    assert explicit.worker_address == "http://10.0.0.5:3000"
