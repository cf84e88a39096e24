"""A stream that survives its worker, the worker's side: `return_token_ids` and `resume`.

Resuming an answer with its first k tokens (engine/resume.py) must give exactly the answer the
uninterrupted run gave, at every cut; over HTTP, the text a client got before the cut plus the
resumed stream's text is the uninterrupted text."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm_engine import InvalidRequestError, LLMEngine
from pagedserve.engine.outputs import CompletionOutput
from pagedserve.engine.resume import Resume
from pagedserve.engine.sampler import SamplingTensors, sample, skip_draws
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence

PROMPT = "Once upon a time"
_ids = itertools.count()

# -- the engine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Iterator[LLMEngine]:
    config = EngineConfig(model=str(tiny_llama), max_model_len=256, kv_cache_memory=16 << 20)
    with LLMEngine(config) as e:
        yield e


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
    seq = Sequence("r", None, [1], params, generator=torch.Generator().manual_seed(9))
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    other = Sequence("o", None, [1], SamplingParams(temperature=1.0))
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
    assert engine.kv_cache.pool.num_used == 0
