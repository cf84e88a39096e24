"""A stream that survives its worker, the worker's side: `return_token_ids` and `resume`.

Resuming an answer with its first k tokens (engine/resume.py) must give exactly the answer the
uninterrupted run gave, at every cut; over HTTP, the text a client got before the cut plus the
resumed stream's text is the uninterrupted text."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from servers import ServerProcess, worker_process

from pagedserve.engine.llm_engine import InvalidRequestError, LLMEngine
from pagedserve.engine.outputs import CompletionOutput
from pagedserve.engine.resume import Resume
from pagedserve.engine.sampler import SamplingTensors, sample, skip_draws
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence

PROMPT = "Once upon a time"
_ids = itertools.count()

# -- the engine ------------------------------------------------------------------------------------


def generate(
    engine: LLMEngine, params: SamplingParams, resume: Resume | None = None
) -> list[CompletionOutput]:
    """Every output of one request, step by step (one new token each)."""
    rid = f"r{next(_ids)}"
    engine.add_request(rid, PROMPT, params, resume)
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.outputs[0] for o in engine.step() if o.request_id == rid]
    return seen


def cuts(n: int) -> list[int]:
    return sorted({0, 1, n // 2, n - 1})


def assert_resumes_exactly(engine: LLMEngine, params: SamplingParams) -> None:
    full = generate(engine, params)
    tokens, last = full[-1].token_ids, full[-1]
    assert len(tokens) >= 4 and len(full) == len(tokens)
    for k in cuts(len(tokens)):
        sent = full[k - 1].text if k else ""  # what the client had been streamed
        resumed = generate(engine, params, Resume(tokens[:k], len(sent)))
        assert resumed[-1].token_ids == tokens, k
        assert resumed[-1].text == last.text and resumed[-1].text.startswith(sent), k
        assert (resumed[-1].finish_reason, resumed[-1].stop_reason) == (
            last.finish_reason,
            last.stop_reason,
        )
        assert len(resumed) == len(tokens) - k  # one output per new token, none for old ones


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=20),
        SamplingParams(temperature=1.0, seed=11, top_k=50, top_p=0.9, max_tokens=24),
        SamplingParams(temperature=0, max_tokens=20, frequency_penalty=2.0),
        SamplingParams(temperature=0.7, seed=5, max_tokens=20, presence_penalty=1.5),
        SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.8),
    ],
    ids=["greedy", "seeded", "seeded-top-k-p", "frequency", "seeded-presence", "repetition"],
)
def test_resuming_at_any_cut_gives_the_uninterrupted_answer(engine, params) -> None:
    assert_resumes_exactly(engine, params)


def test_penalties_count_the_resumed_tokens(engine) -> None:
    """Were the resumed tokens counted as prompt, the frequency penalty would not see them."""
    params = SamplingParams(temperature=0, max_tokens=20, frequency_penalty=2.0)
    plain = generate(engine, SamplingParams(temperature=0, max_tokens=20))[-1].token_ids
    assert generate(engine, params)[-1].token_ids != plain  # the penalty matters here


def test_min_tokens_counts_the_resumed_tokens(engine) -> None:
    greedy = generate(engine, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    stop_token = greedy[-1].token_ids[2]
    ended = generate(
        engine, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_token])
    )
    assert ended[-1].stop_reason == stop_token and len(ended) <= 3
    # Banned until 8 tokens: the answer goes on past it, resumed or not.
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=8, stop_token_ids=[stop_token])
    assert len(generate(engine, params)[-1].token_ids) >= 8
    assert_resumes_exactly(engine, params)


def test_a_stop_string_that_spans_the_cut_ends_the_resumed_answer(engine) -> None:
    plain = generate(engine, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    text = plain[-1].text
    # A stop string from the middle of token 8's text on, found nowhere earlier.
    start = len(plain[7].text) - 2
    stop = text[start : start + 6]
    assert text.find(stop) == start and len(stop) == 6
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop)
    full = generate(engine, params)
    assert full[-1].text == text[:start] and full[-1].stop_reason == stop
    # The last cut leaves the stop string's start among the resumed tokens, part of it held back.
    tokens = full[-1].token_ids
    assert len(full[-2].text) < len(plain[len(tokens) - 2].text)
    assert_resumes_exactly(engine, params)


def test_skip_draws_matches_what_the_sampler_draws() -> None:
    """The seeded generator after k sampling steps equals one advanced by skip_draws(k)."""
    vocab, steps = 37, 5
    params = SamplingParams(temperature=1.0, seed=9)
    seq = Sequence("r", [1], params, generator=torch.Generator().manual_seed(9))
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    other = Sequence("o", [1], SamplingParams(temperature=1.0))
    for _ in range(steps):  # in a batch with an unseeded row, as in the engine
        sample(logits, SamplingTensors.from_seqs([other, seq], [], "cpu"))
    skipped = torch.Generator().manual_seed(9)
    skip_draws(skipped, vocab, steps)
    assert torch.equal(seq.generator.get_state(), skipped.get_state())


@pytest.mark.parametrize(
    ("params", "resume", "says"),
    [
        (SamplingParams(n=2, max_tokens=8), Resume([5]), "n=1"),
        (SamplingParams(best_of=2, max_tokens=8), Resume([5]), "best_of=1"),
        (
            SamplingParams(best_of=2, temperature=0, use_beam_search=True, max_tokens=8),
            Resume([5]),
            "beam",
        ),
        (SamplingParams(max_tokens=8), Resume([5, 1024]), r"token ids in \[0, 1024\)"),
        (SamplingParams(max_tokens=8), Resume([5, -1]), "token ids"),
        (SamplingParams(max_tokens=3), Resume([5, 6, 7]), "max_tokens=3"),
        (SamplingParams(max_tokens=None), Resume([5] * 251), "max_model_len=256"),
        (SamplingParams(max_tokens=8), Resume([5, 6], sent_chars=10_000), "sent_chars"),
        (SamplingParams(max_tokens=8), Resume([5, 6], sent_chars=-1), "sent_chars"),
        (SamplingParams(max_tokens=8, stop_token_ids=[6]), Resume([5, 6]), "already ended"),
    ],
)
def test_bad_resumes_are_refused_and_leave_nothing_behind(engine, params, resume, says) -> None:
    with pytest.raises(InvalidRequestError, match=says) as refused:
        engine.add_request("bad", PROMPT, params, resume)
    assert refused.value.param == "resume"
    assert not engine.has_unfinished_requests()
    assert engine.core.kv_cache.pool.num_used == 0


# -- the worker over HTTP -----------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def worker(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("resume-worker")
    with worker_process(
        log_dir, tiny_llama, None, model_names="tiny", kv_cache_memory=16 << 20, max_model_len=256
    ).start() as w:
        yield w


def request_body(path: str, **fields) -> dict:
    body = {"model": "tiny", "max_tokens": 20, **fields}
    if path == CHAT:
        return {"messages": [{"role": "user", "content": "Tell me a story"}], **body}
    return {"prompt": PROMPT, **body}


def post(w: ServerProcess, path: str, body: dict, request_id: str | None = None) -> httpx.Response:
    headers = {"X-Request-Id": request_id} if request_id else {}
    return httpx.post(w.url + path, json=body, headers=headers, timeout=60)


def stream(w: ServerProcess, path: str, body: dict, request_id: str | None = None) -> list[dict]:
    """The chunks of a stream, [DONE] checked and left out."""
    r = post(w, path, {**body, "stream": True}, request_id)
    assert r.status_code == 200, r.text
    events = [line[len("data: ") :] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def chunk_text(chunk: dict) -> str:
    choice = chunk["choices"][0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice["text"]


def received(chunks: list[dict]) -> tuple[str, list[int]]:
    """What a client holds after these chunks: the text and the token ids."""
    with_choices = [c for c in chunks if c["choices"]]
    text = "".join(chunk_text(c) for c in with_choices)
    return text, [t for c in with_choices for t in c["choices"][0]["token_ids"]]


SAMPLING = {
    "greedy": {"temperature": 0, "ignore_eos": True},
    "seeded": {"temperature": 0.9, "seed": 7},
    "stop": {"temperature": 0, "ignore_eos": True, "stop": "-never-"},
}


@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_a_resumed_stream_continues_the_cut_one_exactly(worker, path, sampling) -> None:
    body = request_body(
        path, return_token_ids=True, stream_options={"include_usage": True}, **SAMPLING[sampling]
    )
    rid = f"resume-{sampling}-{len(path)}"
    full = stream(worker, path, body, rid)
    full_text, full_tokens = received(full)
    usage = full[-1]["usage"]
    assert usage["completion_tokens"] == len(full_tokens)
    assert full[0]["prompt_token_ids"] and all("prompt_token_ids" not in c for c in full[1:])
    content = [j for j, c in enumerate(full) if c["choices"]]
    resumed_at = []
    for j in sorted({1, 2, len(content) // 2, len(content) - 2}):  # cut after chunk j
        text, tokens = received(full[: content[j]])
        if len(tokens) >= usage["completion_tokens"]:
            continue
        resumed_at.append(len(tokens))
        resume = {"output_token_ids": tokens, "sent_chars": len(text)}
        rest = stream(worker, path, {**body, "resume": resume}, rid)
        rest_text, rest_tokens = received(rest)
        assert text + rest_text == full_text, j
        assert tokens + rest_tokens == full_tokens, j
        assert rest[-1]["usage"] == usage
        assert {c["id"] for c in full + rest} == {full[0]["id"]}
        assert full[0]["id"].endswith("-" + rid)
        assert rest[0]["prompt_token_ids"] == full[0]["prompt_token_ids"]
        if path == CHAT:
            assert not any(c["choices"][0]["delta"].get("role") for c in rest if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in full + rest if c["choices"]]
        assert [f for f in finish if f] == [full[-2]["choices"][0]["finish_reason"]] * 2
    assert len(resumed_at) >= 3 and resumed_at[-1] > 0


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_a_resume_answers_unstreamed_with_the_rest(worker, path) -> None:
    body = request_body(path, return_token_ids=True, temperature=0.9, seed=3)
    whole = post(worker, path, body, "whole-1").json()
    full = stream(worker, path, body)
    text, tokens = received(full[:4])
    resume = {"output_token_ids": tokens, "sent_chars": len(text)}
    rest = post(worker, path, {**body, "resume": resume}, "whole-1").json()
    choice, rest_choice = whole["choices"][0], rest["choices"][0]
    key = "message" if path == CHAT else None
    whole_text = choice[key]["content"] if key else choice["text"]
    rest_text = rest_choice[key]["content"] if key else rest_choice["text"]
    assert text + rest_text == whole_text
    assert tokens + rest_choice["token_ids"] == choice["token_ids"]
    assert rest["usage"] == whole["usage"] and rest["id"] == whole["id"]
    assert rest["prompt_token_ids"] == whole["prompt_token_ids"] == full[0]["prompt_token_ids"]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_token_ids_cover_text_held_back_by_a_stop_string(worker, path) -> None:
    plain = post(worker, path, request_body(path, temperature=0, ignore_eos=True)).json()
    text = (
        plain["choices"][0]["message"]["content"] if path == CHAT else plain["choices"][0]["text"]
    )
    stop = text[8:20]  # long: many tokens' text is held back while it might become it
    assert len(stop) == 12 and text.find(stop) == 8
    body = request_body(path, temperature=0, ignore_eos=True, stop=stop, return_token_ids=True)
    chunks = stream(worker, path, body)
    got_text, got_tokens = received(chunks)
    whole = post(worker, path, body).json()
    assert got_text == text[:8]
    assert got_tokens == whole["choices"][0]["token_ids"]
    assert any(c["choices"][0]["token_ids"] and not chunk_text(c) for c in chunks)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_without_return_token_ids_nothing_changes_on_the_wire(worker, path) -> None:
    body = request_body(path, temperature=0, max_tokens=4)
    for chunk in stream(worker, path, body):
        assert "prompt_token_ids" not in chunk
        assert all("token_ids" not in c for c in chunk["choices"])
    whole = post(worker, path, body).json()
    assert "prompt_token_ids" not in whole and "token_ids" not in whole["choices"][0]
    assert whole["id"].startswith("chatcmpl-" if path == CHAT else "cmpl-")


BAD_RESUMES = [
    ({"n": 2}, {"output_token_ids": [5]}, "resume"),
    ({"best_of": 2}, {"output_token_ids": [5]}, "resume"),
    (
        {"best_of": 2, "use_beam_search": True, "temperature": 0},
        {"output_token_ids": [5]},
        "resume",
    ),
    ({}, {"output_token_ids": [5, 1024]}, "resume"),
    ({}, {"output_token_ids": [5], "sent_chars": -1}, "resume"),
    ({}, {"output_token_ids": [5], "sent_chars": 10_000}, "resume"),
    ({"max_tokens": 3}, {"output_token_ids": [5, 6, 7]}, "resume"),
    ({"max_tokens": 400}, {"output_token_ids": [5] * 250}, "resume"),
]


@pytest.mark.parametrize(("fields", "resume", "param"), BAD_RESUMES)
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_bad_resumes_get_a_400_and_the_worker_serves_on(worker, path, fields, resume, param):
    for streamed in (False, True):
        body = request_body(path, stream=streamed, resume=resume, **fields)
        r = post(worker, path, body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
    assert post(worker, path, request_body(path, max_tokens=2)).status_code == 200


def test_resume_and_token_ids_take_a_single_completion_prompt(worker) -> None:
    for extra in ({"resume": {"output_token_ids": [5]}}, {"return_token_ids": True}):
        r = post(worker, COMPLETIONS, {**request_body(COMPLETIONS), "prompt": ["a", "b"], **extra})
        assert r.status_code == 400 and "single prompt" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_a_resumed_answer_has_logprobs_for_its_new_tokens_only(worker, path) -> None:
    asks = {"logprobs": True, "top_logprobs": 2} if path == CHAT else {"logprobs": 2}
    body = request_body(path, temperature=0, ignore_eos=True, return_token_ids=True, **asks)
    whole = post(worker, path, body).json()["choices"][0]
    resume = {"output_token_ids": whole["token_ids"][:5], "sent_chars": 0}
    rest = post(worker, path, {**body, "resume": resume}).json()["choices"][0]

    def per_token(logprobs: dict) -> tuple[list[str], list[float]]:
        if path == CHAT:
            return [e["token"] for e in logprobs["content"]], [
                e["logprob"] for e in logprobs["content"]
            ]
        return logprobs["tokens"], logprobs["token_logprobs"]

    tokens, values = per_token(whole["logprobs"])
    rest_tokens, rest_values = per_token(rest["logprobs"])
    assert rest_tokens == tokens[5:]
    # prefill and decode round differently: the values agree closely
    assert rest_values == pytest.approx(values[5:], abs=1e-4)
    assert rest["token_ids"] == whole["token_ids"][5:]
