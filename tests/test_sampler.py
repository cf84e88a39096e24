"""Tests for engine/sampler.py: greedy, temperature, top-k, top-p, min-p, seeds, banned tokens,
log-probabilities and fan-out."""

from __future__ import annotations

import pytest
import torch

from pagedserve.engine.sampler import Sample, SamplingTensors, _filter, apply_penalties, sample
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence

NEG_INF = -float("inf")
PLAIN = SamplingParams()  # the parameters of a hand-built row's sequence: no penalties


def tensors(
    rows: int,
    temperature: float | list[float] = 1.0,
    top_p: float | list[float] = 1.0,
    top_k: int | list[int] = 0,
    min_p: float | list[float] = 0.0,
    banned: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingTensors:
    def col(value, dtype):
        values = value if isinstance(value, list) else [value] * rows
        assert len(values) == rows
        return torch.tensor(values, dtype=dtype)

    greedy = temperature == 0 if not isinstance(temperature, list) else not any(temperature)
    return SamplingTensors(
        temperature=col(temperature, torch.float32),
        top_p=col(top_p, torch.float32),
        top_k=col(top_k, torch.long),
        min_p=col(min_p, torch.float32),
        banned=banned if banned is not None else [[] for _ in range(rows)],
        generators=generators if generators is not None else [None] * rows,
        seqs=[Sequence("r", [1], PLAIN) for _ in range(rows)],
        num_logprobs=0,
        all_greedy=greedy,
    )


def token_ids(samples: list[Sample]) -> torch.Tensor:
    return torch.tensor([s.token for s in samples], dtype=torch.long)


def logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row > NEG_INF).flatten().tolist()) for row in filtered]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# --- greedy ---------------------------------------------------------------------------------


def test_greedy_rows_take_the_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 100)
    out = token_ids(sample(logits.clone(), tensors(64, temperature=0.0)))
    assert torch.equal(out, logits.argmax(dim=-1))


def test_the_cpu_kernels_greedy_pick_is_the_samplers_own() -> None:
    """The fused argmax-and-logprob (kernels/cpu) that an all-greedy batch takes: the same
    tokens (ties to the first, banned tokens skipped) and logprobs as the torch path."""
    cpu = pytest.importorskip("pagedserve.kernels.cpu")
    if not cpu.available():
        pytest.skip("no CPU kernels here")
    torch.manual_seed(0)
    logits = torch.randn(40, 3000) * 4
    logits[1, [7, 900]] = logits[1].max() + 1  # a tie: the first wins
    logits[2, :] = 0.5  # every token tied
    banned = [[] for _ in range(40)]
    banned[3] = [int(logits[3].argmax())]  # the top token banned: the runner-up wins
    t = tensors(40, temperature=0.0, banned=banned)
    want = sample(logits.clone(), t)
    got = sample(logits.clone(), t, greedy=cpu.greedy_sample)
    assert [s.token for s in got] == [s.token for s in want]
    assert got[1].token == 7 and got[2].token == 0
    torch.testing.assert_close(
        torch.tensor([s.logprob for s in got]), torch.tensor([s.logprob for s in want])
    )


def test_greedy_rows_take_the_argmax_in_a_batch_with_random_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(32, 50)
    temperature = [0.0 if i % 2 == 0 else 1.0 for i in range(32)]
    out = token_ids(
        sample(logits.clone(), tensors(32, temperature=temperature, top_p=0.9, top_k=5))
    )
    assert torch.equal(out[::2], logits[::2].argmax(dim=-1))


def test_top_k_one_equals_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(256, 40)
    out = token_ids(sample(logits.clone(), tensors(256, temperature=1.5, top_k=1)))
    assert torch.equal(out, logits.argmax(dim=-1))


# --- filters --------------------------------------------------------------------------------


def test_top_k_keeps_the_k_largest_logits() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert kept(_filter(logits, tensors(2, top_k=[2, 4]))) == [{1, 3}, {0, 1, 2, 3}]


def test_top_k_zero_and_larger_than_vocab_keep_everything() -> None:
    logits = torch.randn(2, 6)
    assert kept(_filter(logits, tensors(2, top_k=[0, 100]))) == [set(range(6))] * 2


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    # The tokens are shuffled so that the sorted order differs from the vocabulary order.
    probs = [0.15, 0.5, 0.05, 0.3]  # sorted: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    logits = logits_from_probs(probs).repeat(5, 1)
    top_p = [0.45, 0.75, 0.85, 0.97, 1.0]
    assert kept(_filter(logits, tensors(5, top_p=top_p))) == [
        {1},
        {1, 3},
        {1, 3, 0},
        {0, 1, 2, 3},
        {0, 1, 2, 3},
    ]


def test_top_p_always_keeps_the_most_likely_token() -> None:
    logits = logits_from_probs([0.6, 0.2, 0.2])[None]
    assert kept(_filter(logits, tensors(1, top_p=0.01))) == [{0}]


def test_top_p_applies_to_the_probabilities_left_by_top_k() -> None:
    # After top-k=2 the probabilities are 0.625 / 0.375: top-p 0.6 keeps only the first.
    logits = logits_from_probs([0.5, 0.3, 0.2])[None]
    assert kept(_filter(logits, tensors(1, top_k=2, top_p=0.6))) == [{0}]


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability() -> None:
    probs = [0.05, 0.5, 0.3, 0.15]
    logits = logits_from_probs(probs).repeat(3, 1)
    # Thresholds: 0.5 * 0.2 = 0.1, 0.5 * 0.7 = 0.35, off.
    assert kept(_filter(logits, tensors(3, min_p=[0.2, 0.7, 0.0]))) == [
        {1, 2, 3},
        {1},
        {0, 1, 2, 3},
    ]


def test_filters_leave_the_kept_logits_unchanged() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 10)
    filtered = _filter(logits.clone(), tensors(4, top_k=[3, 0, 5, 0], top_p=[1.0, 0.7, 0.9, 1.0]))
    keep = filtered > NEG_INF
    assert torch.equal(filtered[keep], logits[keep])
    assert keep[3].all(), "a row with every filter off is left alone"


def test_top_p_sampling_never_draws_a_masked_token() -> None:
    torch.manual_seed(3)
    probs = [0.15, 0.5, 0.05, 0.3]
    rows = 4000
    logits = logits_from_probs(probs).repeat(rows, 1)
    out = token_ids(sample(logits, tensors(rows, top_p=0.75)))
    counts = torch.bincount(out, minlength=4)
    assert counts[0] == counts[2] == 0
    # The kept tokens keep their relative weights: 0.5 : 0.3 renormalised.
    assert chi_square(counts[[1, 3]].float(), torch.tensor([0.625, 0.375])) < 16.0


# --- random sampling ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
def test_sampled_distribution_matches_softmax_over_temperature(temperature: float) -> None:
    torch.manual_seed(4)
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    rows = 20000
    out = token_ids(sample(logits.repeat(rows, 1), tensors(rows, temperature=temperature)))
    counts = torch.bincount(out, minlength=5).float()
    expected = (logits / temperature).softmax(dim=-1)
    # 4 degrees of freedom: P(chi2 > 25) is about 5e-5.
    assert chi_square(counts, expected) < 25.0


def test_seeded_rows_sample_from_the_same_distribution() -> None:
    logits = torch.tensor([0.5, -1.0, 1.5, 0.0, 0.3])
    rows = 20000
    gen = torch.Generator().manual_seed(11)
    t = tensors(rows, temperature=0.8, generators=[gen] * rows)
    out = token_ids(sample(logits.repeat(rows, 1), t))
    counts = torch.bincount(out, minlength=5).float()
    assert chi_square(counts, (logits / 0.8).softmax(dim=-1)) < 25.0


def draws(seed: int, logits: torch.Tensor, steps: int = 40) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [
        sample(logits.clone(), tensors(1, temperature=1.0, generators=[gen]))[0].token
        for _ in range(steps)
    ]


def test_seeded_generator_reproduces_its_draws() -> None:
    logits = torch.zeros(1, 50)
    torch.manual_seed(0)
    first = draws(123, logits)
    torch.manual_seed(999)  # the global RNG must not matter to a seeded row
    assert draws(123, logits) == first


def test_different_seeds_give_different_draws() -> None:
    logits = torch.zeros(1, 50)
    assert draws(1, logits) != draws(2, logits)


def test_seeded_row_is_independent_of_its_batch_neighbours() -> None:
    torch.manual_seed(5)
    logits = torch.randn(3, 30)
    alone = sample(logits[1:2].clone(), tensors(1, generators=[torch.Generator().manual_seed(7)]))
    batched = sample(
        logits.clone(),
        tensors(3, generators=[None, torch.Generator().manual_seed(7), None]),
    )
    assert batched[1].token == alone[0].token


# --- banned tokens --------------------------------------------------------------------------


def test_banned_tokens_are_never_sampled() -> None:
    torch.manual_seed(6)
    rows = 2000
    logits = torch.tensor([8.0, 1.0, 0.5, 7.0]).repeat(rows, 1)
    temperature = [0.0 if i % 4 == 0 else 1.5 for i in range(rows)]
    out = token_ids(sample(logits, tensors(rows, temperature=temperature, banned=[[0, 3]] * rows)))
    assert not bool(((out == 0) | (out == 3)).any())
    assert set(out.tolist()) == {1, 2}


def seq_with_outputs(params: SamplingParams, num_outputs: int) -> Sequence:
    seq = Sequence("r", [5, 6, 7], params)
    seq.token_ids.extend([8] * num_outputs)
    return seq


def test_eos_and_stop_tokens_are_banned_until_min_tokens_also_with_ignore_eos() -> None:
    params = SamplingParams(min_tokens=3, max_tokens=10, stop_token_ids=[9])
    ignore = SamplingParams(min_tokens=3, max_tokens=10, stop_token_ids=[9], ignore_eos=True)
    seqs = [
        seq_with_outputs(params, 2),
        seq_with_outputs(params, 3),
        seq_with_outputs(ignore, 0),
        seq_with_outputs(ignore, 3),
    ]
    t = SamplingTensors.from_seqs(seqs, eos_token_ids=[2, 4], device="cpu")
    assert [sorted(b) for b in t.banned] == [[2, 4, 9], [], [2, 4, 9], []]


def test_a_banned_stop_token_outside_the_vocabulary_is_ignored() -> None:
    seq = seq_with_outputs(SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[50]), 0)
    t = SamplingTensors.from_seqs([seq], eos_token_ids=[2], device="cpu")
    logits = torch.tensor([[0.0, 1.0, 50.0, 2.0]])
    assert sample(logits, t)[0].token == 3


def test_min_tokens_keeps_a_dominant_eos_from_being_sampled() -> None:
    seq = seq_with_outputs(SamplingParams(temperature=0.0, min_tokens=1), 0)
    t = SamplingTensors.from_seqs([seq], eos_token_ids=[2], device="cpu")
    logits = torch.tensor([[0.0, 1.0, 50.0, 2.0]])
    assert sample(logits, t)[0].token == 3


def test_sampling_tensors_carry_each_sequences_parameters() -> None:
    a = seq_with_outputs(SamplingParams(temperature=0.5, top_p=0.9, top_k=-1, min_p=0.1), 0)
    b = seq_with_outputs(SamplingParams(temperature=0.0, top_k=7), 0)
    b.generator = torch.Generator().manual_seed(1)
    t = SamplingTensors.from_seqs([a, b], eos_token_ids=[2], device="cpu")
    assert t.temperature.tolist() == [0.5, 0.0]
    assert t.top_p.tolist() == pytest.approx([0.9, 1.0])
    assert t.top_k.tolist() == [0, 7]
    assert t.min_p.tolist() == pytest.approx([0.1, 0.0])
    assert t.generators == [None, b.generator]
    assert t.seqs == [a, b]
    assert t.num_logprobs == 0


def test_sample_returns_one_token_per_row_in_the_vocabulary() -> None:
    torch.manual_seed(8)
    logits = torch.randn(16, 33)
    out = sample(logits, tensors(16, temperature=0.9, top_p=0.95, min_p=0.05))
    assert len(out) == 16
    assert all(isinstance(s.token, int) and 0 <= s.token < 33 for s in out)
    assert all(s.top == {} for s in out), "no alternatives unless logprobs are asked for"


# --- log-probabilities, fan-out, penalties --------------------------------------------------


def test_samples_carry_the_logprob_of_their_token_and_the_top_alternatives() -> None:
    torch.manual_seed(9)
    greedy = seq_with_outputs(SamplingParams(temperature=0.0, logprobs=3), 0)
    hot = seq_with_outputs(SamplingParams(temperature=0.5, logprobs=1), 0)
    t = SamplingTensors.from_seqs([greedy, hot], eos_token_ids=[2], device="cpu")
    assert t.num_logprobs == 3, "the most any row asks for"
    logits = torch.randn(2, 12)
    expected = torch.log_softmax(logits, dim=-1)  # before temperature
    out = sample(logits.clone(), t)
    assert out[0].token == int(logits[0].argmax())
    for row, s in enumerate(out):
        assert s.logprob == pytest.approx(float(expected[row, s.token]), abs=1e-5)
        top = expected[row].topk(3)
        assert list(s.top) == top.indices.tolist(), "the alternatives, most likely first"
        assert list(s.top.values()) == pytest.approx(top.values.tolist(), abs=1e-5)


def test_beam_search_rows_ask_for_twice_the_beam_width_of_alternatives() -> None:
    beam = seq_with_outputs(SamplingParams(temperature=0.0, use_beam_search=True, best_of=3), 0)
    t = SamplingTensors.from_seqs([beam], eos_token_ids=[2], device="cpu")
    assert t.num_logprobs == 6


def test_a_prompt_that_fans_out_draws_one_sample_per_row_from_its_logits() -> None:
    torch.manual_seed(10)
    fan = seq_with_outputs(SamplingParams(temperature=1.0, best_of=3, n=3), 0)
    single = seq_with_outputs(SamplingParams(temperature=0.0), 0)
    t = SamplingTensors.from_seqs([fan, single], eos_token_ids=[2], device="cpu", samples=[3, 1])
    assert t.seqs == [fan, fan, fan, single]
    assert t.temperature.tolist() == [1.0, 1.0, 1.0, 0.0]
    logits = torch.full((2, 8), NEG_INF)
    logits[0, [4, 5]] = 0.0  # the fanned-out prompt can only draw 4 or 5
    logits[1] = torch.arange(8.0)
    out = sample(logits, t)
    assert len(out) == 4
    assert {s.token for s in out[:3]} <= {4, 5}
    assert all(s.logprob == pytest.approx(-0.6931, abs=1e-4) for s in out[:3])
    assert out[3].token == 7


def test_penalties_and_logit_bias_follow_openai_and_transformers() -> None:
    def row(**kwargs) -> Sequence:
        seq = Sequence("r", [1, 2], SamplingParams(**kwargs))  # prompt: 1 and 2
        seq.token_ids.extend([2, 3, 3])  # generated: 2 once, 3 twice
        return seq

    seqs = [
        row(presence_penalty=0.5),
        row(frequency_penalty=0.25),
        row(repetition_penalty=2.0),
        row(logit_bias={0: 10.0, 4: -1.5}),
        row(),
    ]
    logits = torch.tensor([1.0, 4.0, -4.0, 6.0, 1.0]).repeat(len(seqs), 1)
    out = apply_penalties(logits.clone(), seqs).tolist()
    # Presence and frequency count generated tokens only; repetition divides the positive and
    # multiplies the negative logits of every token seen, prompt included.
    assert out[0] == pytest.approx([1.0, 4.0, -4.5, 5.5, 1.0])
    assert out[1] == pytest.approx([1.0, 4.0, -4.25, 5.5, 1.0])
    assert out[2] == pytest.approx([1.0, 2.0, -8.0, 3.0, 1.0])
    assert out[3] == pytest.approx([11.0, 4.0, -4.0, 6.0, -0.5])
    assert out[4] == logits[4].tolist(), "a row without penalties is left alone"


# --- min_tokens against transformers' min_new_tokens ----------------------------------------

MIN_TOKENS, MAX_TOKENS = 8, 16
STOP = 653
# tiny_llama's greedy continuation of each of these emits EOS within MIN_TOKENS tokens, and
# that of [259] the token STOP before it.
EOS_EARLY = [[75], [259], [396], [909], [1006]]


def transformers_greedy(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """transformers' greedy continuation under `params`, through the processor that
    `min_new_tokens` builds, banning EOS and the stop tokens until `min_tokens`. transformers
    has no ignore_eos: with it, EOS is banned all the same but no longer ends the sequence."""
    from transformers import LogitsProcessorList, MinNewTokensLengthLogitsProcessor

    eos = model.generation_config.eos_token_id
    ends = [*params.stop_token_ids, *([] if params.ignore_eos else [eos])]
    ban = MinNewTokensLengthLogitsProcessor(
        len(prompt), params.min_tokens, [eos, *params.stop_token_ids]
    )
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=params.max_tokens, do_sample=False,
        logits_processor=LogitsProcessorList([ban]), eos_token_id=ends or None, pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def tiny_pair(tiny_llama):
    """transformers' model and pagedserve's engine on tiny_llama's weights."""
    from transformers import AutoModelForCausalLM

    from pagedserve.engine.llm import LLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with LLM(tiny_llama, max_model_len=64) as llm:
        yield model, llm


def test_the_prompts_reach_eos_and_the_stop_token_inside_min_tokens(tiny_pair) -> None:
    model, _ = tiny_pair
    free = [
        transformers_greedy(model, p, SamplingParams(temperature=0, max_tokens=MIN_TOKENS))
        for p in EOS_EARLY
    ]
    assert all(out[-1] == model.generation_config.eos_token_id for out in free)
    assert any(STOP in out for out in free)


@pytest.mark.parametrize(
    "ignore_eos, stop_token_ids",
    [(False, []), (True, []), (False, [STOP]), (True, [STOP])],
    ids=["eos", "ignore_eos", "stop_token", "stop_token_ignore_eos"],
)
def test_min_tokens_matches_transformers_min_new_tokens(tiny_pair, ignore_eos, stop_token_ids):
    model, llm = tiny_pair
    params = SamplingParams(
        temperature=0, min_tokens=MIN_TOKENS, max_tokens=MAX_TOKENS,
        ignore_eos=ignore_eos, stop_token_ids=stop_token_ids,
    )  # fmt: skip
    got = [o.outputs[0].token_ids for o in llm.generate(EOS_EARLY, params, use_tqdm=False)]
    assert got == [transformers_greedy(model, p, params) for p in EOS_EARLY]
    assert all(len(out) >= MIN_TOKENS for out in got)
