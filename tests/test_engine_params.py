"""worker/engine_params.py: OpenAI's and FastChat's sampling fields become the same
SamplingParams, and what the engine cannot take is refused with a 400 naming it."""

from __future__ import annotations

import dataclasses

import pytest

from pagedserve.engine.sampling_params import RequestOutputKind
from pagedserve.protocol.fastchat import GenerateParams
from pagedserve.protocol.openai import ChatCompletionRequest, CompletionRequest
from pagedserve.worker.engine_params import from_fastchat, from_openai
from pagedserve.worker.requests import RequestError

SHARED = {
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "stop": ["\n\n"],
    "stop_token_ids": [3],
    "seed": 11,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "repetition_penalty": 1.2,
    "best_of": 3,
}


def fields(params) -> dict:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def test_the_same_request_in_either_protocol_samples_alike() -> None:
    openai = from_openai(CompletionRequest(model="m", prompt="x", **SHARED), 20, 2)
    fastchat = from_fastchat(GenerateParams(prompt="x", max_new_tokens=20, logprobs=2, **SHARED))
    assert fields(openai) == fields(fastchat)
    assert openai.output_kind is RequestOutputKind.DELTA
    assert (openai.top_k, openai.best_of, openai.logprobs) == (40, 3, 2)


def test_fastchat_parameters_the_engine_has_learned_are_no_longer_refused() -> None:
    params = GenerateParams(
        prompt="x", temperature=0, best_of=2, use_beam_search=True, logprobs=3,
        presence_penalty=1.0, frequency_penalty=1.0, repetition_penalty=1.5,
    )  # fmt: skip
    assert params.unsupported() == []
    sampling = from_fastchat(params)
    assert sampling.use_beam_search and sampling.beam_width == 2 and sampling.logprobs == 3
    images = GenerateParams(prompt="x", images=["data:image/png;base64,AAAA"])
    assert images.unsupported() == ["images"]
    with pytest.raises(RequestError, match="images") as refused:
        from_fastchat(images)
    assert refused.value.status == 400 and refused.value.param == "images"


def test_a_near_zero_fastchat_temperature_is_greedy_as_in_fastchats_vllm_worker() -> None:
    sampling = from_fastchat(GenerateParams(prompt="x", temperature=1e-6, top_p=0.5))
    assert sampling.greedy and sampling.top_p == 1.0
    assert from_fastchat(GenerateParams(prompt="x", top_p=0.0)).top_p == 1e-5


def test_left_out_openai_fields_take_the_engines_neutral_values() -> None:
    sampling = from_openai(CompletionRequest(model="m", prompt="x"), None, None)
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p) == (1, 1, 0, 0)
    assert sampling.repetition_penalty == 1.0 and sampling.max_tokens is None


def test_a_chat_template_adds_its_stops_once() -> None:
    class Template:
        stop = ["<|im_end|>", "\n\n"]
        stop_token_ids = [3, 9]

    req = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "x"}], stop="\n\n", stop_token_ids=[3]
    )
    sampling = from_openai(req, 8, None, Template())
    assert sampling.stop_strings == ["\n\n", "<|im_end|>"]
    assert sampling.stop_token_ids == [3, 9]


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"logit_bias": {"5": 1.0, "dog": 2.0}}, "logit_bias", "logit_bias keys must be token"),
        ({"best_of": 17}, "best_of", "best_of must be at most 16"),
        ({"n": 3, "best_of": 2}, None, r"n \(3\) must not exceed best_of \(2\)"),
        ({"use_beam_search": True, "best_of": 2}, None, "set temperature to 0"),
    ],
)
def test_what_the_engine_refuses_is_a_400_that_says_why(extra, param, says) -> None:
    with pytest.raises(RequestError, match=says) as refused:
        from_openai(CompletionRequest(model="m", prompt="x", **extra), 16, None)
    assert refused.value.status == 400 and refused.value.param == param
