"""Sharing the KV cache: parallel samples, best_of and beams on copy-on-write blocks, prefix
caching, logprobs and penalties, checked against transformers where it defines the answer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

from pagedserve.engine.llm import LLM
from pagedserve.engine.sampler import apply_penalties
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence

EOS = 2  # the tiny models' </s>


def random_prompts(count: int, low: int, high: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(5, 1000, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, max_model_len=256, kv_cache_memory=1 << 22)


def assert_all_blocks_free(llm):
    stats = llm.engine.stats()
    assert stats.num_blocks_used == 0 and not llm.engine.requests


@pytest.mark.parametrize(
    "width,n,length_penalty,early_stopping",
    [(4, 2, 1.0, False), (3, 3, 0.5, True), (4, 1, 1.2, "never"), (2, 2, -0.5, False)],
)
def test_beam_search_matches_transformers(llm, hf_tiny, width, n, length_penalty, early_stopping):
    prompts = random_prompts(5, 2, 40, seed=3)
    params = SamplingParams(
        n=n, best_of=width, use_beam_search=True, temperature=0, max_tokens=12,
        length_penalty=length_penalty, early_stopping=early_stopping,
    )  # fmt: skip
    outs = llm.generate(prompts, params, use_tqdm=False)  # all prompts in one batch
    for prompt, out in zip(prompts, outs, strict=True):
        ref = hf_tiny.generate(
            torch.tensor([prompt]), num_beams=width, num_return_sequences=n, max_new_tokens=12,
            do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping,
            pad_token_id=0, return_dict_in_generate=True, output_scores=True,
        )  # fmt: skip
        expected = []
        for row in ref.sequences[:, len(prompt) :].tolist():
            expected.append(row[: row.index(EOS) + 1] if EOS in row else row)
        assert [c.token_ids for c in out.outputs] == expected
    assert_all_blocks_free(llm)


def test_parallel_samples_share_the_prompt_then_diverge_by_copy_on_write(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=256, kv_cache_memory=1 << 22, block_size=8)
    engine = llm.engine
    prompt = random_prompts(1, 21, 22, seed=1)[0]  # 21 tokens: the third block is partly full
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    engine.add_request("r", prompt, params)
    engine.step()  # prefill, then four samples of the first token
    group = engine.requests["r"]
    assert len(group.seqs) == 4
    tables = [engine.core.kv_cache.block_tables[s.seq_id] for s in group.seqs]
    assert all(t == tables[0] for t in tables)  # one copy of the prompt for all four
    assert all(engine.core.kv_cache.pool.ref_counts[b] == 4 for b in tables[0])
    copies_before = engine.stats().num_cow_copies
    engine.step()  # each writes its own token into the shared partial block
    tables = [engine.core.kv_cache.block_tables[s.seq_id] for s in group.seqs]
    assert all(t[:2] == tables[0][:2] for t in tables)  # full blocks stay shared
    assert len({t[2] for t in tables}) == 4  # the partial block was copied for three of them
    assert engine.stats().num_cow_copies - copies_before == 3
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_blocks_free(llm)


def test_parallel_sampling_is_reproducible_with_a_seed_and_differs_across_seeds(llm):
    prompt = random_prompts(1, 10, 11, seed=2)[0]

    def run(seed):
        params = SamplingParams(n=4, temperature=1.0, seed=seed, max_tokens=10, ignore_eos=True)
        return [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]

    first, again, other = run(5), run(5), run(6)
    assert first == again
    assert first != other
    assert len({tuple(s) for s in first}) > 1  # the four samples are not all the same
    assert_all_blocks_free(llm)


def test_best_of_returns_the_n_most_likely_of_its_candidates(llm):
    prompt = random_prompts(1, 12, 13, seed=4)[0]
    params = SamplingParams(n=2, best_of=5, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert len(out.outputs) == 2
    every = llm.generate(
        [prompt],
        SamplingParams(n=5, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )[0]
    best = sorted(every.outputs, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in best]


def test_logprobs_equal_transformers_log_softmax(llm, hf_tiny):
    prompt = random_prompts(1, 15, 16, seed=8)[0]
    params = SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=3
    )
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    full = prompt + completion.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_tiny(torch.tensor([full])).logits[0].float(), dim=-1)
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + i]
        assert entry[token] == pytest.approx(row[token].item(), abs=1e-4)
        top = row.topk(5)
        for tok, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert entry[tok] == pytest.approx(lp, abs=1e-4)
    assert out.prompt_logprobs[0] is None
    for j in range(1, len(prompt)):
        assert out.prompt_logprobs[j][prompt[j]] == pytest.approx(
            ref[j - 1, prompt[j]].item(), abs=1e-4
        )
        assert len(out.prompt_logprobs[j]) >= 3
    assert completion.cumulative_logprob == pytest.approx(
        sum(e[t] for t, e in zip(completion.token_ids, completion.logprobs, strict=True)), abs=1e-4
    )


@pytest.mark.parametrize("logprobs", [0, 3])
def test_beam_search_logprobs_equal_transformers_log_softmax(llm, hf_tiny, logprobs):
    """Every returned beam, ended by EOS or by length, carries each of its tokens' logprob
    (and the top alternatives of its step), and they add up to its cumulative logprob."""
    prompt = random_prompts(1, 20, 21, seed=5)[0]
    params = SamplingParams(n=3, best_of=3, use_beam_search=True, temperature=0, max_tokens=10,
                            logprobs=logprobs)  # fmt: skip
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert len(out.outputs) == 3
    for beam in out.outputs:
        assert len(beam.logprobs) == len(beam.token_ids)
        with torch.no_grad():
            full = torch.tensor([prompt + beam.token_ids])
            ref = torch.log_softmax(hf_tiny(full).logits[0].float(), dim=-1)
        for i, (token, entry) in enumerate(zip(beam.token_ids, beam.logprobs, strict=True)):
            row = ref[len(prompt) - 1 + i]
            assert entry[token] == pytest.approx(row[token].item(), abs=1e-4)
            top = row.topk(logprobs) if logprobs else None
            assert len(entry) <= logprobs + 1
            for tok, lp in zip(*(top.indices.tolist(), top.values.tolist()) if top else ((), ()),
                               strict=True):  # fmt: skip
                assert entry[tok] == pytest.approx(lp, abs=1e-4)
        assert beam.cumulative_logprob == pytest.approx(
            sum(e[t] for t, e in zip(beam.token_ids, beam.logprobs, strict=True)), abs=1e-4
        )
    unasked = llm.generate([prompt], SamplingParams(n=2, best_of=3, use_beam_search=True,
                                                    temperature=0, max_tokens=4), use_tqdm=False)  # fmt: skip
    assert all(c.logprobs is None for c in unasked[0].outputs)


def test_prefix_cache_reuses_the_shared_prefix_and_changes_no_output(tiny_llama):
    shared = random_prompts(1, 64, 65, seed=9)[0]
    prompts = [shared + tail for tail in random_prompts(4, 3, 9, seed=10)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    cached = LLM(tiny_llama, max_model_len=256, kv_cache_memory=1 << 22)
    plain = LLM(tiny_llama, max_model_len=256, kv_cache_memory=1 << 22, enable_prefix_caching=False)
    first = cached.generate(prompts[:1], params, use_tqdm=False)
    before = cached.engine.stats()
    rest = cached.generate(prompts[1:], params, use_tqdm=False)
    after = cached.engine.stats()
    reference = plain.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first + rest] == [
        o.outputs[0].token_ids for o in reference
    ]
    # The later requests computed only their own tails: 64 shared tokens = 4 cached blocks each.
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == 3 * 64
    assert plain.engine.stats().prefix_cache_hit_tokens == 0
    assert_all_blocks_free(cached)


def test_prefix_cache_eviction_under_pressure_never_corrupts_running_sequences(tiny_llama):
    # 20 blocks of 16: far fewer than the requests need, so cached blocks are evicted and
    # requests preempted all the time; greedy outputs must still equal a roomy engine's.
    prompts = [
        p + q
        for p, q in zip(
            random_prompts(12, 30, 31, seed=11) * 1, random_prompts(12, 1, 40, seed=12), strict=True
        )
    ]
    prompts += [prompts[0][:40] + [7, 8, 9]] * 3
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    tight = LLM(tiny_llama, max_model_len=128, kv_cache_memory=20 * 16 * 2 * 2 * 16 * 4 * 2)
    roomy = LLM(tiny_llama, max_model_len=128, kv_cache_memory=1 << 22, enable_prefix_caching=False)
    got = tight.generate(prompts, params, use_tqdm=False)
    want = roomy.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0 and tight.engine.core.kv_cache.pool.num_evictions > 0
    assert_all_blocks_free(tight)


def test_repetition_penalty_matches_transformers_processor():
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    seqs = [
        Sequence("a", [3, 4, 4, 9], SamplingParams(repetition_penalty=1.3)),
        Sequence("b", [1, 2, 30], SamplingParams(repetition_penalty=0.7)),
    ]
    ours = apply_penalties(logits.clone(), seqs)
    for i, seq in enumerate(seqs):
        proc = RepetitionPenaltyLogitsProcessor(seq.params.repetition_penalty)
        ref = proc(torch.tensor([seq.token_ids]), logits[i : i + 1].clone())
        assert torch.allclose(ours[i], ref[0])


def test_presence_frequency_penalties_and_logit_bias_follow_openai():
    torch.manual_seed(0)
    logits = torch.randn(1, 20)
    params = SamplingParams(
        presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: 5.0, 7: -2.0}
    )
    seq = Sequence("a", [1, 2], params)
    seq.token_ids += [5, 5, 6]  # generated: 5 twice, 6 once (the prompt's tokens do not count)
    ours = apply_penalties(logits.clone(), [seq])[0]
    want = logits[0].clone()
    want[5] -= 0.5 + 2 * 0.25
    want[6] -= 0.5 + 0.25
    want[3] += 5.0
    want[7] -= 2.0
    assert torch.allclose(ours, want)


def test_combined_penalties_apply_in_vllms_order():
    """logit_bias, then the repetition penalty, then frequency and presence: on one token that
    all of them touch, each order gives a different number."""
    logits = torch.zeros(1, 10)
    logits[0, 5] = 1.0
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                            logit_bias={5: 3.0})  # fmt: skip
    seq = Sequence("a", [1, 2], params)
    seq.token_ids += [5, 5]
    got = apply_penalties(logits.clone(), [seq])[0, 5].item()
    assert got == pytest.approx((1.0 + 3.0) / 2.0 - 2 * 0.5 - 0.25)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(n=3, best_of=2), "must not exceed best_of"),
        (dict(best_of=0), "best_of"),
        (dict(use_beam_search=True, best_of=3, temperature=0.7), "temperature"),
        (dict(use_beam_search=True, best_of=3, temperature=0, top_p=0.9), "top_p"),
        (dict(logprobs=21), "logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(logit_bias={5: 500}), "logit_bias"),
        (dict(early_stopping="sometimes"), "early_stopping"),
    ],
)
def test_bad_sharing_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
