"""engine/engine_core.py: the core steps on token ids alone. Each step reports only what it
added; stop strings are the output processor's, and the core ends the sequence it names; the
scheduler's block tables and the runner's results are plain copies, not live engine state."""

from __future__ import annotations

from pagedserve.engine.engine_core import CoreOutput
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence

PROMPT = [1, 17, 42, 99, 5, 23, 8, 64, 2, 11]


def drain_core(engine: LLMEngine) -> list[CoreOutput]:
    outs = []
    while engine.core.has_unfinished_requests():
        outs += engine.core.step()
    return outs


def test_each_core_step_carries_only_the_new_tokens(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    engine.core.add(Sequence("core", list(PROMPT), params))
    outs = drain_core(engine)
    assert len(outs) == 12, "one output per sampled token"
    assert all(len(o.seqs) == 1 and len(o.seqs[0].new_token_ids) == 1 for o in outs)
    assert all(len(o.seqs[0].new_logprobs) == 1 for o in outs)
    assert [o.seqs[0].num_output_tokens for o in outs] == list(range(1, 13))
    assert [o.finished for o in outs] == [False] * 11 + [True]
    assert outs[-1].seqs[0].finish_reason == "length"
    tokens = [o.seqs[0].new_token_ids[0] for o in outs]
    # The same request through the whole engine gives the same tokens.
    engine.add_request("whole", list(PROMPT), params)
    while engine.has_unfinished_requests():
        final = engine.step()
    assert final[0].outputs[0].token_ids == tokens


def test_a_stop_string_found_in_the_text_ends_the_core_sequence(engine: LLMEngine) -> None:
    probe = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engine.add_request("probe", list(PROMPT), probe)
    while engine.has_unfinished_requests():
        done = engine.step()
    text = done[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"the tiny model's text {text!r} gives no usable stop string"
    engine.add_request("stopped", list(PROMPT), SamplingParams(
        temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]))  # fmt: skip
    outputs, before = [], engine.core.generation_tokens_total
    while engine.has_unfinished_requests():
        outputs += engine.step()
    last = outputs[-1].outputs[0]
    generated = engine.core.generation_tokens_total - before
    assert generated == len(last.token_ids), "the core computed nothing past the stop"
    assert last.finish_reason == "stop" and last.stop_reason == stop
    assert text.startswith(last.text) and stop not in last.text
    assert len(last.token_ids) < 16, "the core stopped at the token that completed the string"
    assert not engine.core.requests
    assert not engine.core.kv_cache.block_tables, "its blocks went back"


def test_the_scheduler_hands_out_copies_of_block_tables(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.core.add(Sequence("tables", list(PROMPT) * 3, params))
    sched = engine.core.scheduler.schedule()
    live = engine.core.kv_cache.block_tables[sched.seqs[0].seq_id]
    assert sched.block_tables[0] == live and sched.block_tables[0] is not live
    engine.core.abort("tables")
    assert not engine.core.requests


def test_prompt_logprobs_come_back_in_the_output_not_in_the_sequence(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    engine.core.add(Sequence("plp", list(PROMPT), params))
    outs = drain_core(engine)
    entries = [e for o in outs if o.new_prompt_logprobs for e in o.new_prompt_logprobs]
    assert entries[0] is None and len(entries) == len(PROMPT)
    assert all(PROMPT[i] in e for i, e in enumerate(entries) if e is not None)
    assert not hasattr(Sequence("x", [1], params), "prompt_logprobs")
