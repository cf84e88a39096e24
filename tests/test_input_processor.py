"""engine/input_processor.py: every refusal of a request, said once, in one place; chat messages
rendered as transformers renders them; and the worker's three generate routes answering an
over-long prompt with the same 400."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import ServerProcess, worker_process

from pagedserve.engine.chat_templates import (
    JinjaChatTemplate,
    MissingChatTemplate,
    resolve_chat_template,
)
from pagedserve.engine.input_processor import InputProcessor, InvalidRequestError
from pagedserve.engine.resume import Resume
from pagedserve.engine.sampling_params import SamplingParams

MAX_MODEL_LEN = 64
VOCAB = 1024  # the tiny Llama's
BUDGET = 32  # max_num_batched_tokens
GREEDY = SamplingParams(temperature=0.0, max_tokens=4)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where does the sun rise?"},
    {"role": "assistant", "content": "In the east."},
    {"role": "user", "content": "And set?"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def processor(tokenizer, chunked_prefill: bool = True, template=None) -> InputProcessor:
    return InputProcessor(
        tokenizer,
        template or resolve_chat_template(tokenizer, "tiny"),
        max_model_len=MAX_MODEL_LEN,
        vocab_size=VOCAB,
        max_num_seqs=4,
        max_num_batched_tokens=BUDGET,
        enable_chunked_prefill=chunked_prefill,
    )


# -- process ----------------------------------------------------------------------------------


def test_a_text_prompt_becomes_an_engine_request_with_its_token_ids(tokenizer) -> None:
    resume = Resume([5, 6])
    req = processor(tokenizer).process("r1", "The sun rises", GREEDY, resume)
    assert req.request_id == "r1" and req.prompt == "The sun rises"
    assert req.prompt_token_ids == tokenizer.encode("The sun rises")
    assert req.params is GREEDY and req.resume is resume
    given = {"prompt": "shown", "prompt_token_ids": [7, 8]}
    assert processor(tokenizer).process("r2", given, GREEDY).prompt_token_ids == [7, 8]
    assert processor(tokenizer).process("r3", (7, 8), GREEDY).prompt is None


@pytest.mark.parametrize(
    ("prompt", "params", "says"),
    [
        ("hi", {"temperature": 0.0}, "sampling params must be a SamplingParams"),
        ("", GREEDY, "the prompt is empty"),
        ([], GREEDY, "the prompt is empty"),
        ({"prompt_token_ids": []}, GREEDY, "the prompt is empty"),
        ({}, GREEDY, "the prompt is empty"),
        ([5, VOCAB], GREEDY, rf"prompt token ids must be in \[0, {VOCAB}\)"),
        ([5, -1], GREEDY, rf"prompt token ids must be in \[0, {VOCAB}\)"),
        ([5, True], GREEDY, "a prompt is a string, a list of integer token ids"),
        ({"prompt_token_ids": "5 6"}, GREEDY, "a prompt is a string, a list of integer"),
        (5, GREEDY, "a prompt is a string, a list of integer token ids"),
        ([5], SamplingParams(n=2, best_of=5), r"best_of/beam width 5 exceeds .*max_num_seqs=4"),
    ],
)
def test_each_refusal_says_what_is_wrong_and_names_no_other_param(
    tokenizer, prompt, params, says: str
) -> None:
    with pytest.raises(InvalidRequestError, match=says) as refused:
        processor(tokenizer).process("r", prompt, params)
    assert refused.value.param is None and refused.value.code is None


def test_the_context_length_check_leaves_one_token_to_generate(tokenizer) -> None:
    p = processor(tokenizer)
    assert len(p.process("fits", [5] * (MAX_MODEL_LEN - 1), GREEDY).prompt_token_ids) == 63
    with pytest.raises(InvalidRequestError) as refused:
        p.process("full", [5] * MAX_MODEL_LEN, GREEDY)
    assert str(refused.value).startswith(
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your "
        f"prompt has {MAX_MODEL_LEN} tokens"
    )
    assert f"at most {MAX_MODEL_LEN - 1}" in str(refused.value)
    assert refused.value.code == "context_length_exceeded" and refused.value.param is None


def test_without_chunked_prefill_a_prompt_must_fit_one_step(tokenizer) -> None:
    p = processor(tokenizer, chunked_prefill=False)
    assert len(p.process("fits", [5] * BUDGET, GREEDY).prompt_token_ids) == BUDGET
    with pytest.raises(InvalidRequestError, match=f"max_num_batched_tokens={BUDGET} without"):
        p.process("big", [5] * (BUDGET + 1), GREEDY)
    assert len(processor(tokenizer).process("chunked", [5] * 40, GREEDY).prompt_token_ids) == 40


# -- chat --------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_renders_as_transformers_apply_chat_template(
    tokenizer, add_generation_prompt: bool
) -> None:
    ids = processor(tokenizer).render_chat(MESSAGES, add_generation_prompt)
    want = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ids == list(want)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n" * add_generation_prompt)


def test_chat_template_kwargs_reach_a_jinja_template(tokenizer) -> None:
    source = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ tail | default('') }}"
    p = processor(tokenizer, template=JinjaChatTemplate(tokenizer, source))
    plain = p.render_chat(MESSAGES[1:2])
    assert tokenizer.decode(plain) == "Where does the sun rise?"
    tailed = p.render_chat(MESSAGES[1:2], chat_template_kwargs={"tail": " Answer:"})
    assert tokenizer.decode(tailed) == "Where does the sun rise? Answer:"


def test_chat_a_template_refuses_is_a_refusal_of_the_messages(tokenizer) -> None:
    vicuna = resolve_chat_template(tokenizer, "tiny", explicit="vicuna_v1.1")
    with pytest.raises(InvalidRequestError, match="expected a user message") as refused:
        processor(tokenizer, template=vicuna).render_chat([{"role": "assistant", "content": "x"}])
    assert refused.value.param == "messages"
    missing = MissingChatTemplate("gpt2")
    with pytest.raises(InvalidRequestError, match="has no chat template") as refused:
        processor(tokenizer, template=missing).render_chat(MESSAGES)
    assert refused.value.param == "messages"


# -- the worker: one check, one 400 on every route -------------------------------------------------


@pytest.fixture(scope="module")
def worker(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("worker")
    options = {"model_names": "tiny", "kv_cache_memory": 16 << 20, "max_model_len": 256}
    with worker_process(log_dir, tiny_llama, None, **options).start() as w:
        yield w


def test_an_over_long_prompt_gets_the_same_400_on_every_route(worker: ServerProcess) -> None:
    long = "hi " * 400
    post = {"timeout": 30}
    completion = httpx.post(
        worker.url + "/v1/completions", json={"model": "tiny", "prompt": long}, **post
    )
    chat = httpx.post(
        worker.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": long}]},
        **post,
    )
    fastchat = httpx.post(worker.url + "/worker_generate_stream", json={"prompt": long}, **post)
    assert (completion.status_code, chat.status_code, fastchat.status_code) == (400, 400, 400)
    error = completion.json()["error"]
    assert error["message"].startswith("This model's maximum context length is 256 tokens.")
    assert error == {
        "message": error["message"],
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "context_length_exceeded",
    }
    chat_error = chat.json()["error"]
    assert chat_error["message"].startswith("This model's maximum context length is 256 tokens.")
    assert chat_error == {**error, "param": "messages", "message": chat_error["message"]}
    assert json.loads(fastchat.content.rstrip(b"\0")) == {
        "text": error["message"],  # the same prompt: the same sentence
        "error_code": 40303,  # FastChat's CONTEXT_OVERFLOW
    }


def test_the_longest_prompt_that_fits_is_served(worker: ServerProcess) -> None:
    body = {"model": "tiny", "prompt": [5] * 255, "max_tokens": 5, "temperature": 0}
    r = httpx.post(worker.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": 255, "completion_tokens": 1, "total_tokens": 256}
    too_long = httpx.post(
        worker.url + "/v1/completions", json={**body, "prompt": [5] * 256}, timeout=30
    )
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
