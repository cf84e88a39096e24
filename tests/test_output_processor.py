"""engine/output_processor.py: delta outputs add up to the whole answer, and each holds only
what its step added; FINAL_ONLY gives one output; beam search and best_of > n end whole."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from pathlib import Path

import pytest

from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.resume import Resume
from pagedserve.engine.sampling_params import RequestOutputKind, SamplingParams

PROMPT = "Once upon a time"
DELTA, CUMULATIVE, FINAL = (
    RequestOutputKind.DELTA,
    RequestOutputKind.CUMULATIVE,
    RequestOutputKind.FINAL_ONLY,
)
_ids = itertools.count()


def run(
    engine: LLMEngine,
    params: SamplingParams,
    kind: RequestOutputKind,
    resume: Resume | None = None,
    abort_after: int | None = None,
) -> list[RequestOutput]:
    """Every output of one request, run alone, step by step."""
    rid = f"r{next(_ids)}"
    engine.add_request(rid, PROMPT, dataclasses.replace(params, output_kind=kind), resume)
    seen: list[RequestOutput] = []
    while engine.has_unfinished_requests():
        seen += [o for o in engine.step() if o.request_id == rid]
        if abort_after is not None and len(seen) == abort_after:
            seen.append(engine.abort_request(rid))
    return seen


def joined(deltas: list[RequestOutput]) -> dict[int, dict]:
    """Each sequence's deltas put together."""
    whole: dict[int, dict] = {}
    for out in deltas:
        for c in out.outputs:
            w = whole.setdefault(c.index, {"text": "", "token_ids": [], "logprobs": []})
            assert w.get("finish_reason") is None, "nothing comes after a sequence's end"
            w["text"] += c.text
            w["token_ids"] += c.token_ids
            w["logprobs"] += c.logprobs or []
            w["finish_reason"], w["stop_reason"] = c.finish_reason, c.stop_reason
            w["num_output_tokens"] = c.num_output_tokens
    return whole


def whole(out: RequestOutput) -> dict[int, dict]:
    return {
        c.index: {
            "text": c.text,
            "token_ids": c.token_ids,
            "logprobs": c.logprobs or [],
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
            "num_output_tokens": len(c.token_ids),
        }
        for c in out.outputs
    }


def greedy_text(engine: LLMEngine) -> str:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return run(engine, params, FINAL)[0].outputs[0].text


CASES = {
    "greedy": SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
    "seeded": SamplingParams(temperature=0.9, seed=7, max_tokens=20, logprobs=1),
    "n=2": SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=16, logprobs=0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_deltas_add_up_to_the_cumulative_answer(engine: LLMEngine, name: str) -> None:
    params = CASES[name]
    cumulative = run(engine, params, CUMULATIVE)
    deltas = run(engine, params, DELTA)
    assert deltas[-1].finished and all(not o.finished for o in deltas[:-1])
    assert joined(deltas) == whole(cumulative[-1])
    assert len(joined(deltas)) == params.n


def test_stop_strings_held_back_text_comes_in_later_deltas(engine: LLMEngine) -> None:
    text = greedy_text(engine)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop.strip()) == 3, f"pick another cut of {text!r}"
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "zzzzzz"])
    cumulative = run(engine, params, CUMULATIVE)
    deltas = run(engine, params, DELTA)
    final = cumulative[-1].outputs[0]
    assert (final.finish_reason, final.stop_reason) == ("stop", stop)
    assert joined(deltas) == whole(cumulative[-1])
    # while running, a delta's text is what the cumulative output's visible text grew by
    texts = [o.outputs[0].text for o in cumulative]
    grew = [b[len(a) :] for a, b in zip([""] + texts, texts, strict=False)]
    assert [o.outputs[0].text for o in deltas] == grew
    assert any(not d.outputs[0].text for d in deltas[:-1]), "some text was held back"


def test_a_delta_holds_only_its_step_not_the_history(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    deltas = run(engine, params, DELTA)
    assert len(deltas) == 12
    prompt_ids = deltas[0].prompt_token_ids
    for k, out in enumerate(deltas):
        (c,) = out.outputs
        assert len(c.token_ids) == 1 and len(c.logprobs) == 1, k
        assert c.num_output_tokens == k + 1
        assert out.prompt_token_ids is prompt_ids, "the prompt is not copied each step"


def test_final_only_gives_one_whole_output(engine: LLMEngine) -> None:
    params = CASES["n=2"]
    final = run(engine, params, FINAL)
    assert len(final) == 1 and final[0].finished
    assert whole(final[0]) == whole(run(engine, params, CUMULATIVE)[-1])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(use_beam_search=True, best_of=3, n=2, temperature=0, max_tokens=8),
        SamplingParams(best_of=3, n=1, temperature=1.0, seed=5, max_tokens=8),
    ],
    ids=["beam", "best_of"],
)
def test_answers_chosen_at_the_end_come_whole_once(engine: LLMEngine, params) -> None:
    deltas = run(engine, params, DELTA)
    assert len(deltas) == 1 and deltas[0].finished
    assert whole(deltas[0]) == whole(run(engine, params, CUMULATIVE)[-1])


def test_a_resumed_delta_stream_starts_where_the_client_copy_ends(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    full = run(engine, params, CUMULATIVE)
    k = 5
    sent = full[k - 1].outputs[0].text
    deltas = run(engine, params, DELTA, Resume(full[-1].outputs[0].token_ids[:k], len(sent)))
    got = joined(deltas)[0]
    last = full[-1].outputs[0]
    assert sent + got["text"] == last.text
    assert got["token_ids"] == last.token_ids[k:]
    assert len(got["logprobs"]) == len(got["token_ids"])  # the prefill's numerics differ a bit
    for entry, expected in zip(got["logprobs"], last.logprobs[k:], strict=True):
        assert entry == pytest.approx(expected, abs=1e-4)
    assert got["num_output_tokens"] == len(last.token_ids)


def test_an_aborted_delta_stream_ends_with_its_held_back_text(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=["zzzzzzzz"])
    deltas = run(engine, params, DELTA, abort_after=6)
    assert len(deltas) == 7 and deltas[-1].finished
    assert deltas[-1].outputs[0].finish_reason == "abort"
    cumulative = run(engine, params, CUMULATIVE, abort_after=6)
    assert joined(deltas) == whole(cumulative[-1])


def test_output_kind_takes_its_name_and_refuses_others() -> None:
    assert SamplingParams(output_kind="delta").output_kind is DELTA
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="sometimes")


def test_async_engine_streams_deltas(tiny_llama: Path) -> None:
    params = SamplingParams(n=2, temperature=0.8, seed=9, max_tokens=10, logprobs=1)

    async def main() -> tuple[list[RequestOutput], list[RequestOutput]]:
        engine = AsyncEngine(
            EngineConfig(model=str(tiny_llama), max_model_len=256, kv_cache_memory=16 << 20)
        )
        try:
            runs = []
            for i, kind in enumerate((DELTA, CUMULATIVE)):
                p = dataclasses.replace(params, output_kind=kind)
                runs.append([o async for o in engine.generate(PROMPT, p, f"a{i}")])
            return runs[0], runs[1]
        finally:
            await engine.shutdown()

    deltas, cumulative = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert joined(deltas) == whole(cumulative[-1])
